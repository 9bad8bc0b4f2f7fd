"""Export a trained Light adapter for stock diffusers: ``python export.py checkpoint=<ckpt> output=<folder>``."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig

from camouflage_train.export import export_adapter


@hydra.main(version_base="1.3", config_path="configs", config_name="export.yaml")
def main(cfg: DictConfig) -> None:
    folder = export_adapter(
        cfg.checkpoint, cfg.output, base_model=cfg.base_model, overwrite=cfg.overwrite, dataset=cfg.dataset
    )
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>12,d}  {path.relative_to(folder)}")


if __name__ == "__main__":
    main()
