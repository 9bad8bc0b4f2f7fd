"""A local dataset in the layout of ``mattymchen/celeba-hq`` (docs/hub_repositories.yaml): the same file names,
splits and columns (``image``: Image, ``label``: ClassLabel female/male), a dataset card with the same
``dataset_info`` header (its sizes the stand-in's), and one synthetic face per image instead of a photo.

``datasets.load_dataset(<folder>, split=...)`` reads it as it reads the hub repository's files.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import yaml

from camouflage_train.data.schema import AttributeSchema
from camouflage_train.data.synthetic import draw_scene
from tests.hub_standin import record

REPO_ID = "mattymchen/celeba-hq"


def build_celebahq_standin(
    folder: Path, per_file: int = 2, validation: int = 4, resolution: int = 64, seed: int = 9_000_000
) -> Path:
    """Write the stand-in under ``folder``: ``per_file`` images in each recorded train file, ``validation`` in the
    validation file."""
    schema = AttributeSchema.from_config(
        yaml.safe_load((Path(__file__).parents[1] / "configs/attributes/face.yaml").read_text())
    )
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["female", "male"])})
    files = record(REPO_ID)["files"]
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    index = 0
    for name in files:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not name.endswith(".parquet"):
            continue
        split = Path(name).name.split("-")[0]
        images, labels = [], []
        for _ in range(validation if split == "validation" else per_file):
            image, persons = draw_scene(seed + index, schema, resolution, min_persons=1, max_persons=1)
            images.append(image)
            labels.append(0 if persons[0].get("gender") == "female" else 1)
            index += 1
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(target))
        counts[split] = counts.get(split, 0) + len(images)
        sizes[split] = sizes.get(split, 0) + target.stat().st_size
    card = {
        "dataset_info": {
            "features": [
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": {"class_label": {"names": {"0": "female", "1": "male"}}}},
            ],
            "splits": [
                {"name": split, "num_bytes": sizes[split], "num_examples": count} for split, count in counts.items()
            ],
        }
    }
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n# CelebA-HQ layout stand-in\n")
    (folder / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return folder
