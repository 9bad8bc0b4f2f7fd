"""Export a trained Light adapter for stock diffusers: ``python export.py checkpoint=<ckpt> output=<folder>``."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from camouflage_train.cli import main_with_key_help, run_task
from camouflage_train.export import run_export


@hydra.main(version_base="1.3", config_path="configs", config_name="export.yaml")
def main(cfg: DictConfig) -> None:
    run_task(run_export, cfg)


if __name__ == "__main__":
    main_with_key_help(main, Path(__file__).parent / "configs", "export.yaml")
