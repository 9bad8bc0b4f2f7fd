"""Annotate images with person records: ``python annotate.py input.folder=<images> output=<sidecar.jsonl>``."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from camouflage_train.annotation.run import run_annotation
from camouflage_train.cli import main_with_key_help, run_task


@hydra.main(version_base="1.3", config_path="configs", config_name="annotate.yaml")
def main(cfg: DictConfig) -> None:
    summary = run_task(run_annotation, cfg)
    if rank_zero_only.rank == 0:  # every process returns the merged summary; one prints it
        print(summary.as_dict())


if __name__ == "__main__":
    main_with_key_help(main, Path(__file__).parent / "configs", "annotate.yaml")
