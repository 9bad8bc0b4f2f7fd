"""Export a trained Light adapter for stock diffusers: ``python export.py checkpoint=<ckpt> output=<folder>``.

Add ``hub.repo_id=<owner>/<name>`` to push the finished folder, model card included, to that Hugging Face model
repository (private when it is created, unless ``hub.private=false``; log in first with ``hf auth login`` or set
``HF_TOKEN``); the commit's URL is printed. If the push fails, the export is kept and the same command run again
pushes it without exporting again. See :mod:`camouflage_train.export`.
"""

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
