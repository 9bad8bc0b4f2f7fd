"""Evaluate a trained Light adapter: ``python evaluate.py experiment=demo ckpt_path=<run>/checkpoints/last.ckpt``.

For now this reports the seeded validation loss and writes a sample grid (real | generated) to the run
folder; the joint Base/Light anonymization metrics (re-ID, FID/KID, CLIP, attributes) build on it.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from camouflage_train.training import run_validation


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> None:
    cfg.task_name = f"eval_{cfg.task_name}"
    print(run_validation(cfg))


if __name__ == "__main__":
    main()
