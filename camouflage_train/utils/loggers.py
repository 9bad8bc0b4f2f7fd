"""Experiment loggers that never need the network to start."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def _wandb_server() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def _has_wandb_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(server: tuple[str, int], timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(server, timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto``: honour ``WANDB_MODE``; else online only when logged in and the server answers, offline otherwise."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    server = _wandb_server()
    host = server[0]
    if not _has_wandb_key(host):
        log.info("W&B: no API key found, logging offline (sync later with `wandb sync`)")
        return "offline"
    if not _reachable(server):
        log.warning("W&B: %s is not reachable, logging offline (sync later with `wandb sync`)", host)
        return "offline"
    return "online"


def wandb_logger(project: str, save_dir: str, mode: str = "auto", **kwargs: Any) -> WandbLogger:
    """A Lightning ``WandbLogger`` whose mode is decided by :func:`resolve_wandb_mode`."""
    resolved = resolve_wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    extra = {} if resolved in ("online", "offline") else {"mode": resolved}
    return WandbLogger(project=project, save_dir=save_dir, offline=resolved == "offline", **extra, **kwargs)
