"""Build everything from a composed Hydra config and run ``trainer.fit``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from camouflage_train.data.sources import check_sidecars
from camouflage_train.errors import DataError, UserError
from camouflage_train.utils.checkpoints import checkpoint_folder, resolve_checkpoint
from camouflage_train.utils.config_checks import validate_config
from camouflage_train.utils.instantiators import instantiate_group

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The top-level keys of ``configs/train.yaml`` (``train.py``); the groups are checked by their targets.

    Args:
        task_name: the run folder's name under ``logs/``.
        seed: the global seed (``None``: not seeded).
        ckpt_path: ``auto``, ``last``, a checkpoint file or ``None`` (see ``configs/train.yaml``).
        optimized_metric: what ``train.py`` returns to sweepers.
        attributes: the attribute schema group.
        data: the data group.
        model: the model group.
        callbacks: the callbacks group.
        logger: the loggers group.
        trainer: the Lightning trainer.
        paths: the paths group.
    """

    task_name: str = "train"
    seed: int | None = None
    ckpt_path: str | None = "auto"
    optimized_metric: str = "val/loss"
    attributes: Any = None
    data: Any = None
    model: Any = None
    callbacks: Any = None
    logger: Any = None
    trainer: Any = None
    paths: Any = None


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Fit the model described by ``cfg``; return the final callback metrics (also written to ``metrics.json``).

    Args:
        cfg: the composed ``configs/train.yaml``.
    """
    validate_config(cfg, TrainConfig)  # before anything is built or written
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    check_sidecars(cfg.data)  # seconds, before the backbone's download
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = instantiate(cfg.model)  # first: a missing backbone fails before any data is read
    datamodule = instantiate(cfg.data)
    callbacks = instantiate_group(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    if trainer.is_global_zero:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    ckpt_path = resolve_checkpoint(
        cfg.get("ckpt_path"),
        checkpoint_folder(trainer, output_dir / "checkpoints"),
        move_corrupt=rank_zero_only.rank == 0,  # one process renames unreadable files; the others skip them
    )
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except torch.OutOfMemoryError as error:
        raise OutOfMemoryAdvice(out_of_memory_message(cfg, error)) from error
    finally:
        for logger in trainer.loggers:
            logger.finalize("success")
        _finish_wandb()
    if trainer.global_step == 0 and trainer.max_steps != 0:
        raise DataError(
            "training ran no optimizer step (every batch was skipped or empty; see data/train_skipped and the "
            "log above); no checkpoint was written"
        )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["model/trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("final metrics: %s", metrics)
    last = checkpoint_folder(trainer, output_dir / "checkpoints") / "last.ckpt"
    backbone = OmegaConf.select(cfg, "model.backbone.pretrained_model_name_or_path")
    if trainer.is_global_zero and last.is_file() and backbone and "adapter" in cfg.model:
        configs, resolution = Path(cfg.paths.root_dir) / "configs", cfg.data.resolution
        print(next_steps(last, str(backbone), configs, cfg.get("task_name", "run"), resolution))
    return metrics


def next_steps(checkpoint: Path, backbone: str, config_dir: Path, task_name: str, resolution: int) -> str:
    """What to run on a Light run's checkpoint: evaluate, export, anonymize, with the anonymizer config made for
    its base (the one whose ``base_model`` is ``backbone``; ``light`` when none is).

    Args:
        checkpoint: the run's ``last.ckpt``.
        backbone: the base it was trained on, as configured.
        config_dir: the project's ``configs/``.
        task_name: the run's task name (``demo``, ``light_celebahq``, ...).
        resolution: the training resolution (what anonymize.py should resize to).
    """
    configs = sorted((config_dir / "anonymize" / "model").glob("light*.yaml"))
    anonymizer = next((p.stem for p in configs if OmegaConf.load(p).get("base_model") == backbone), "light")
    evaluation = f"eval_{task_name}" if (config_dir / "experiment" / f"eval_{task_name}.yaml").is_file() else None
    mini = backbone == "preset:mini"  # the mini world's own face pack and sample scenes
    images = "examples/mini_scenes" if mini else "<images>"
    return "\n".join(
        [
            f"Training done. Checkpoint: {checkpoint}",
            "Next (README, 'Evaluate, export, anonymize'):",
            *([f"  python evaluate.py experiment={evaluation} light_checkpoint={checkpoint}"] if evaluation else []),
            f"  python export.py checkpoint={checkpoint} output=exports/{task_name} anonymizer={anonymizer}",
            f"  python anonymize.py model={anonymizer} model.checkpoint={checkpoint}"
            + (" faces=mini bodies=none" if mini else "")
            + f" resolution={resolution} input.folder={images} output=outputs/{task_name}_anonymized",
        ]
    )


class OutOfMemoryAdvice(UserError, RuntimeError):
    """The GPU ran out of memory; the message names the settings that lower the peak."""


def out_of_memory_message(cfg: DictConfig, error: BaseException) -> str:
    """What ran out of memory and the options that fit it, most of the speed kept first.

    Args:
        cfg: the training config.
        error: torch's out-of-memory error.
    """
    data, model = cfg.data, cfg.model
    batch, accumulate = int(data.batch_size), int(cfg.trainer.get("accumulate_grad_batches") or 1)
    checkpointing = model.get("gradient_checkpointing", False)
    cached = bool((data.get("cache") or {}).get("enabled"))
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    options = []
    if batch > 1:
        options.append(
            f"data.batch_size={batch // 2} trainer.accumulate_grad_batches={accumulate * 2} (the same effective batch)"
        )
    if checkpointing not in ("high_res", True):
        options.append(
            "model.gradient_checkpointing=high_res (SD 1.5 at 512², batch 16: 0.70x the peak at 0.87x the speed), "
            "or =true (0.58x at 0.64x)"
        )
    if not cached:
        options.append("data.cache.enabled=true (the VAE and the text encoder leave the training step)")
    listed = "".join(f"\n  - {option}" for option in options)
    return (
        f"out of GPU memory ({first}) at data.batch_size={batch}, data.resolution={data.get('resolution')}, "
        f"model.gradient_checkpointing={checkpointing}, data.cache.enabled={cached}. Options:{listed}\n"
        "The README's 'Speed and memory' section has the peak memory of each batch size."
    )


def _finish_wandb() -> None:
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
