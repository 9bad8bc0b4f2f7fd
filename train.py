"""Train a CAMOUFLaGE-Light adapter: ``python train.py experiment=demo``."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from camouflage_train.cli import main_with_key_help, run_task
from camouflage_train.training import run_training


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics = run_task(run_training, cfg)
    return metrics.get(cfg.get("optimized_metric", "val/loss"))


if __name__ == "__main__":
    main_with_key_help(main, Path(__file__).parent / "configs", "train.yaml")
