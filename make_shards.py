"""Write training data as litdata shards for ``data=streaming``: ``python make_shards.py data=folder output=<uri>``."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from camouflage_train.cli import main_with_key_help, run_task
from camouflage_train.shards import run_shards


@hydra.main(version_base="1.3", config_path="configs", config_name="shards.yaml")
def main(cfg: DictConfig) -> None:
    print(run_task(run_shards, cfg))


if __name__ == "__main__":
    main_with_key_help(main, Path(__file__).parent / "configs", "shards.yaml")
