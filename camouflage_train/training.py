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


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def _prepare(cfg: DictConfig) -> tuple[Path, L.LightningModule, L.LightningDataModule]:
    """Seed, create the run folder, then build the model (first: a missing backbone fails before any data
    is read) and the datamodule."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir, instantiate(cfg.model), instantiate(cfg.data)


def _write_metrics(output_dir: Path, metrics: dict[str, Any]) -> dict[str, float]:
    scalars = {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    (output_dir / "metrics.json").write_text(json.dumps(scalars, indent=2, sort_keys=True))
    log.info("final metrics: %s", scalars)
    return scalars


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Fit the model described by ``cfg``; return the final callback metrics (also written to ``metrics.json``)."""
    output_dir, model, datamodule = _prepare(cfg)
    callbacks = instantiate_group(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")))
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
    sizes = {"model/trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return _write_metrics(output_dir, {**trainer.callback_metrics, **sizes})


def _finish_wandb() -> None:
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
