"""Annotate images with person records: ``python annotate.py input.folder=<images> output=<sidecar.jsonl>``."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from camouflage_train.annotation.run import ImageListing, annotate_dataset


@hydra.main(version_base="1.3", config_path="configs", config_name="annotate.yaml")
def main(cfg: DictConfig) -> None:
    listing = ImageListing(**cfg.input)
    annotator = instantiate(cfg.faces)
    summary = annotate_dataset(
        listing,
        annotator,
        cfg.output,
        cfg.attributes.max_persons,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
    )
    print(summary.as_dict())


if __name__ == "__main__":
    main()
