"""Build everything from a composed Hydra config and run ``trainer.fit``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Fit the model described by ``cfg``; return the final callback metrics (also written to ``metrics.json``)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The model first: a missing backbone should fail before any data is read.
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        for logger in trainer.loggers:
            logger.finalize("success")
        _finish_wandb()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("final metrics: %s", metrics)
    return metrics


def run_validation(cfg: DictConfig) -> dict[str, float]:
    """Validate a trained adapter (``ckpt_path``) on ``cfg.data``'s val split: seeded loss and a sample grid."""
    if not cfg.get("ckpt_path"):
        raise ValueError("evaluate.py needs ckpt_path=<a checkpoint from a training run's checkpoints/ folder>")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    trainer = instantiate(cfg.trainer, logger=_instantiate_group(cfg.get("logger")), callbacks=[])
    try:
        results = trainer.validate(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    finally:
        _finish_wandb()
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _finish_wandb() -> None:
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
