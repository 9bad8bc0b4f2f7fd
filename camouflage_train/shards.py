"""``make_shards.py``: write the training data a data config describes as litdata shards (see
:mod:`camouflage_train.data.streaming`), on this machine's processes or on several machines at once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from camouflage_train.data.sources import check_sidecars
from camouflage_train.data.streaming import META_NAME, shards_exist, write_shards
from camouflage_train.errors import InputError
from camouflage_train.utils.config_checks import ConfigError, validate_config

log = logging.getLogger(__name__)


@dataclass
class ShardsConfig:
    """The top-level keys of ``configs/shards.yaml`` (``make_shards.py``).

    Args:
        output: the shards' folder or object-store URI.
        overwrite: replace shards already there.
        num_workers: writer processes on this machine.
        num_nodes: machines writing together.
        node_rank: this machine's place among them.
        chunk_bytes: the largest chunk.
        batch_size: images per writer call.
        shorter_side: store images scaled down to this shorter side (``None``: as they are).
        latents: also store the latent-cache tensors.
        device: where latents are encoded.
        storage_options: the object store's options.
        start_method: how the writer processes start (``None``: litdata's default).
        task_name: the run folder's name under ``logs/``.
        seed: the run's seed (the data config's ``seed`` reads it).
        attributes: the attribute schema group.
        data: the data group (a map-style data module).
        model: the model group (its backbone encodes latents).
        callbacks: unused (experiment files set it).
        logger: unused (experiment files set it).
        trainer: unused (experiment files set it).
        paths: the paths group.
    """

    output: str
    overwrite: bool = False
    num_workers: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    chunk_bytes: str = "64MB"
    batch_size: int = 16
    shorter_side: int | None = None
    latents: bool = False
    device: str = "auto"
    storage_options: Any = None
    start_method: str | None = None
    task_name: str = "shards"
    seed: int | None = None
    attributes: Any = None
    data: Any = None
    model: Any = None
    callbacks: Any = None
    logger: Any = None
    trainer: Any = None
    paths: Any = None


def run_shards(cfg: DictConfig) -> dict[str, Any]:
    """Check the config and inputs, then write ``cfg.data``'s train and validation splits under ``cfg.output``;
    return what was written.

    Args:
        cfg: the composed ``configs/shards.yaml``.
    """
    validate_config(cfg, ShardsConfig)
    if str(cfg.data.get("_target_", "")).endswith("StreamingPersonDataModule"):
        raise ConfigError("data=streaming reads shards; make_shards.py writes them from a map-style data config")
    output = str(cfg.output)
    storage_options = OmegaConf.to_container(cfg.storage_options, resolve=True) if cfg.storage_options else None
    if not 0 <= int(cfg.node_rank) < int(cfg.num_nodes):
        raise ConfigError(f"node_rank={cfg.node_rank} must be in [0, num_nodes={cfg.num_nodes})")
    if cfg.overwrite and int(cfg.num_nodes) > 1:
        raise ConfigError(
            "overwrite=true with num_nodes > 1: a machine starting late would delete what the others wrote; clear the "
            "output first and run without overwrite"
        )
    if not cfg.overwrite and shards_exist(output, storage_options):
        raise InputError(f"output: {output} already holds shards ({META_NAME}); pass overwrite=true to replace them")
    check_sidecars(cfg.data)
    datamodule = instantiate(cfg.data)
    latents = None
    if cfg.latents:
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        backbone = OmegaConf.to_container(cfg.model.backbone, resolve=True)
        if datamodule.encoder_loader is None:
            raise ConfigError("latents=true needs data.encoder_loader (the data configs set it)")
        latents = {
            "backbone": backbone,
            "dtype": (cfg.data.get("cache") or {}).get("dtype", "fp16"),
            "encoder_loader": datamodule.encoder_loader,
            "device": device,
        }
    start = time.perf_counter()
    meta = write_shards(
        datamodule,
        output,
        num_workers=int(cfg.num_workers),
        chunk_bytes=str(cfg.chunk_bytes),
        shorter_side=cfg.shorter_side,
        latents=latents,
        storage_options=storage_options,
        overwrite=bool(cfg.overwrite),
        batch_size=int(cfg.batch_size),
        start_method=cfg.start_method,
        num_nodes=int(cfg.num_nodes),
        node_rank=int(cfg.node_rank),
    )
    seconds = time.perf_counter() - start
    items = sum(split["items"] for split in meta["splits"].values())
    summary = {
        "output": output,
        "splits": meta["splits"],
        "latents": meta["latents"]["key"] if meta["latents"] else None,
        "seconds": round(seconds, 2),
        "images_per_s": round(items / seconds, 2) if seconds else None,
    }
    log.info("shards written: %s", summary)
    return summary
