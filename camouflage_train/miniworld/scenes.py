"""Scene banks for the mini-world builders: images, person records and captions drawn once, kept in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camouflage_train.data.dataset import CaptionBuilder
from camouflage_train.data.schema import AttributeSchema
from camouflage_train.data.synthetic import draw_scene

# The base model learns from captions that name the number of people only: every per-person attribute and every
# place must come from the adapter, so the `no_adapter` evaluation row measures what the base does on its own.
MINI_CAPTIONS = CaptionBuilder(template="a photo of {count} people", prefer_dataset_caption=False)


# The attributes the synthetic scenes draw: configs/attributes/face.yaml as data (a test keeps the two equal).
FACE_ATTRIBUTES: dict[str, Any] = {
    "max_persons": 4,
    "continuous": {
        "age": {"low": 0, "high": 100},
        "yaw": {"low": -90, "high": 90, "mirror": True},
        "pitch": {"low": -90, "high": 90},
        "roll": {"low": -90, "high": 90, "mirror": True},
    },
    "categorical": {"gender": ["female", "male"]},
    "body": {"from_face": [1.0, 0.3, 1.0, 3.0]},
}


def face_schema() -> AttributeSchema:
    """The attribute schema of the miniature world: the face attributes of ``configs/attributes/face.yaml``."""
    return AttributeSchema.from_config(FACE_ATTRIBUTES)


@dataclass
class SceneBank:
    """Synthetic scenes drawn once and held in memory for the mini world's trainers.

    Args:
        images: ``[N, 3, H, W]`` uint8.
        persons: each scene's person records.
        captions: each scene's caption.
        seeds: each scene's seed.
    """

    images: torch.Tensor  # [N, 3, H, W] uint8
    persons: list[list[dict[str, Any]]]
    captions: list[str]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.seeds)

    def pixels(self, index: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``index`` in [-1, 1]; rows where ``flip`` is true mirrored.

        Args:
            index: the scenes.
            flip: which of them to mirror (``None``: none).
        """
        x = self.images[index].float() / 127.5 - 1.0
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


def draw_bank(first_seed: int, count: int, resolution: int, schema: AttributeSchema | None = None) -> SceneBank:
    """Scenes ``first_seed .. first_seed + count - 1`` exactly as :class:`SyntheticSource` draws them.

    Args:
        first_seed: the first scene's seed.
        count: how many scenes.
        resolution: their size in pixels.
        schema: the attribute schema (default the mini world's).
    """
    schema = schema or face_schema()
    images, persons, captions, seeds = [], [], [], []
    for seed in range(first_seed, first_seed + count):
        image, records = draw_scene(seed, schema, resolution)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        persons.append(records)
        captions.append(MINI_CAPTIONS(None, records))
        seeds.append(seed)
    return SceneBank(torch.stack(images), persons, captions, seeds)


# Scenes shipped as sample input for anonymize.py in the mini world (examples/mini_scenes/): seeds no build, selection
# or report uses.
EXAMPLE_FIRST_SEED = 9_000_000
EXAMPLE_COUNT = 6
EXAMPLE_RESOLUTION = 64


def write_example_scenes(folder: str | Path) -> list[Path]:
    """Write the sample input scenes (PNG files named by seed) into ``folder``; return their paths.

    Args:
        folder: where to write them (``examples/mini_scenes`` in the repository).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in range(EXAMPLE_FIRST_SEED, EXAMPLE_FIRST_SEED + EXAMPLE_COUNT):
        image, _ = draw_scene(seed, face_schema(), EXAMPLE_RESOLUTION)
        written.append(folder / f"scene_{seed}.png")
        image.save(written[-1], format="PNG")
    return written


if __name__ == "__main__":  # python -m camouflage_train.miniworld.scenes examples/mini_scenes
    import sys

    for path in write_example_scenes(sys.argv[1] if len(sys.argv) > 1 else "examples/mini_scenes"):
        print(path)
