"""Experiment loggers that never need the network to start, and that continue a resumed run.

A run folder is one run: re-running a killed job into the same folder (``ckpt_path=auto``) appends to its
``metrics.csv`` (rows the killed process logged after the checkpoint it resumes from are replaced, not
repeated) and logs to the same W&B run id, online or offline (``wandb sync`` then joins the parts).
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

from camouflage_train.compat.lightning_internals import ResumableCSVLogger

__all__ = ["ResumableCSVLogger", "resolve_wandb_mode", "run_id_of", "wandb_logger"]

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
    """``auto``: honour ``WANDB_MODE``; else online only when logged in and the server answers, offline otherwise.

    Args:
        mode: ``auto``, ``online``, ``offline`` or ``disabled``.
    """
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


def run_id_of(folder: str | Path) -> str:
    """The W&B run id of a run folder: created once (``wandb_run_id.txt``), read back by every later start and
    by every process of the run (the first writer wins; the file is never half-written).

    Args:
        folder: the run folder.
    """
    path = Path(folder) / "wandb_run_id.txt"
    if not path.is_file():
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(secrets.token_hex(4))
        try:
            os.link(staging, path)  # fails if another process created it first
        except FileExistsError:
            pass
        finally:
            staging.unlink(missing_ok=True)
    return path.read_text().strip()


def wandb_logger(project: str, save_dir: str, mode: str = "auto", **kwargs: Any) -> WandbLogger:
    """A Lightning ``WandbLogger`` whose mode is decided by :func:`resolve_wandb_mode`, logging to the run
    folder's own W&B run id (:func:`run_id_of`), so a resumed run continues the same W&B run.

    Args:
        project: the W&B project (keyword arguments go to ``WandbLogger``).
        save_dir: the run folder.
        mode: ``auto``, ``online``, ``offline`` or ``disabled``.
    """
    resolved = resolve_wandb_mode(mode)
    os.makedirs(save_dir, exist_ok=True)
    extra = {} if resolved in ("online", "offline") else {"mode": resolved}
    kwargs.setdefault("id", run_id_of(save_dir))
    return WandbLogger(project=project, save_dir=save_dir, offline=resolved == "offline", **extra, **kwargs)
