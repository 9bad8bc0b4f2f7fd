"""Training-loader throughput: streamed shards (``data=streaming``) against the map-style folder, with and without
the latent cache, in one run on one machine.

    python bench/data_loading.py                                   # 192 JPEG images of 512², 2 loader workers
    python bench/data_loading.py --images 1024 --workers 8 --out bench/results/<date>_<machine>_data_loading.json

The images are the synthetic scenes drawn at ``--image-size`` and saved as JPEG files with a person-record sidecar
(a ``data=folder`` dataset); ``make_shards.py``'s writer turns them into shards on the local disk (the files' bytes as
they are). Uncached loaders decode, resize, crop and build the person arrays at ``--resolution``; cached ones read
the tiny preset's latents (its VAE halves the size, so a latent is 4 x (resolution/2)²: larger than SD 1.5's
4 x (resolution/8)², which makes the cached rows a pessimistic bound on reading). Each loader runs one warm-up epoch,
then ``--rounds`` timed epochs, the four alternating; the median epoch's images/s is reported, with the ratio of
streaming to map-style at equal settings. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, emit, load_yaml
from camouflage_train.data.datamodule import PersonDataModule
from camouflage_train.data.sources import FolderSource, SyntheticSource
from camouflage_train.data.streaming import StreamingPersonDataModule, write_shards
from camouflage_train.models.backbone import load_frozen_backbone
from camouflage_train.models.presets import materialize_preset


def write_folder(folder: Path, schema: dict[str, Any], images: int, size: int) -> Path:
    """``images`` synthetic scenes as JPEG files plus their ``persons.jsonl``."""
    source = SyntheticSource(schema, images, size, seed=0)
    (folder / "images").mkdir(parents=True)
    with (folder / "persons.jsonl").open("w") as handle:
        for index in range(images):
            sample = source[index]
            name = f"{index:06d}.jpg"
            sample.image.save(folder / "images" / name, quality=90)
            handle.write(json.dumps({"file": name, "persons": sample.persons}) + "\n")
    return folder


def epoch_rate(loader: Any) -> tuple[float, int]:
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += int(batch["size"])
    return seen / (time.perf_counter() - start), seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    schema = load_yaml(REPO / "configs/attributes/face.yaml")
    backbone = {"pretrained_model_name_or_path": "preset:tiny", "weight_dtype": "fp32"}
    materialize_preset("tiny")
    common = dict(
        schema=schema, resolution=args.resolution, random_crop=False, flip_prob=0.5, batch_size=args.batch_size,
        num_workers=args.workers, seed=0,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp) / "data", schema, args.images, args.image_size)

        def folder_module(cached: bool) -> PersonDataModule:
            source = FolderSource(root / "images", root / "persons.jsonl", schema=schema)
            cache = {"enabled": cached, "root": str(Path(tmp) / "cache"), "backbone": backbone, "dtype": "fp16"}
            module = PersonDataModule(
                source, val_source=source, cache=cache, encoder_loader=load_frozen_backbone, **common
            )
            module.prepare_data()
            module.setup("fit")
            return module

        start = time.perf_counter()
        write_shards(folder_module(False), str(Path(tmp) / "shards"), num_workers=args.workers)
        shard_seconds = time.perf_counter() - start
        start = time.perf_counter()
        write_shards(
            folder_module(False), str(Path(tmp) / "shards_latents"), num_workers=args.workers,
            latents={"backbone": backbone, "dtype": "fp16", "device": "cpu", "encoder_loader": load_frozen_backbone},
        )  # fmt: skip
        latent_shard_seconds = time.perf_counter() - start

        def streaming_module(cached: bool) -> StreamingPersonDataModule:
            folder = Path(tmp) / ("shards_latents" if cached else "shards")
            cache = {"enabled": cached, "backbone": backbone, "dtype": "fp16"}
            module = StreamingPersonDataModule(str(folder), cache=cache, **common)
            module.setup("fit")
            return module

        loaders = {
            "map-style": folder_module(False).train_dataloader,
            "streaming": streaming_module(False).train_dataloader,
            "map-style, latent cache": folder_module(True).train_dataloader,
            "streaming, latents in the shards": streaming_module(True).train_dataloader,
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        counts: dict[str, int] = {}
        for make in loaders.values():  # warm-up: page cache, worker start-up paths
            epoch_rate(make())
        for _ in range(args.rounds):
            for name, make in loaders.items():
                rate, counts[name] = epoch_rate(make())
                rates[name].append(rate)
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "benchmark": "data_loading",
        "machine": f"cpu ({torch.get_num_threads()} threads)",
        "images": args.images,
        "image_size": args.image_size,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "images_per_epoch": counts,
        "images_per_s": {name: round(value, 1) for name, value in median.items()},
        "all_rounds": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "streaming_over_map_style": round(median["streaming"] / median["map-style"], 3),
        "streaming_over_map_style_cached": round(
            median["streaming, latents in the shards"] / median["map-style, latent cache"], 3
        ),
        # both splits are written (each holds every image here); with latents only the training split is encoded
        "make_shards_seconds": round(shard_seconds, 1),
        "make_shards_with_latents_seconds": round(latent_shard_seconds, 1),
    }
    for name, value in median.items():
        print(f"{name:34s} {value:8.1f} images/s")
    emit(result, args.out)


if __name__ == "__main__":
    main()
