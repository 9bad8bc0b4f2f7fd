"""Anonymize a folder: ``python anonymize.py model=base|light input.folder=<images> output=<folder>``."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from camouflage_train.anonymization import RETIRED_KEYS, run_anonymization
from camouflage_train.cli import main_with_key_help, run_task


@hydra.main(version_base="1.3", config_path="configs/anonymize", config_name="anonymize.yaml")
def main(cfg: DictConfig) -> None:
    summary = run_task(run_anonymization, cfg)
    if rank_zero_only.rank == 0:  # every process returns the merged summary; one prints it
        print(summary)


if __name__ == "__main__":
    main_with_key_help(main, Path(__file__).parent / "configs" / "anonymize", "anonymize.yaml", RETIRED_KEYS)
