"""Joint evaluation of CAMOUFLaGE-Base and -Light against identity and blur rows:
``python evaluate.py experiment=eval_demo light_checkpoint=<checkpoint>``."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from camouflage_train.cli import main_with_key_help, run_task
from camouflage_train.evaluation import run_evaluation


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    run_task(run_evaluation, cfg)


if __name__ == "__main__":
    main_with_key_help(main, Path(__file__).parent / "configs", "evaluate.yaml")
