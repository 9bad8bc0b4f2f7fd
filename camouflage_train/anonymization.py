"""Anonymize a folder of images with CAMOUFLaGE-Base or -Light (``anonymize.py``).

Flow: annotate the folder into person records (resumable; or use a given sidecar) -> the training data
path (robust decoding, resize + centre crop, person arrays, captions) -> the chosen pipeline -> images
written under ``<output>/images/`` with the input's relative file names, and a ``manifest.jsonl`` with one
row per input (done, with its seed and person count, or skipped with the reason). Reruns skip what is done.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from camouflage_train.annotation.run import ImageListing, annotate_dataset
from camouflage_train.data.dataset import CaptionBuilder, PersonImageDataset, collate_skipping
from camouflage_train.data.schema import AttributeSchema
from camouflage_train.data.sources import FolderSource
from camouflage_train.models.backbone import load_frozen_backbone
from camouflage_train.models.ip_adapter import person_region_masks
from camouflage_train.pipelines.base import CamouflageBase, build_controls
from camouflage_train.pipelines.light import CamouflageLight, PersonBatch
from camouflage_train.utils.paths import UnsafePathError, inside

log = logging.getLogger(__name__)


def build_base(
    backbone: Mapping[str, Any],
    controlnets: Mapping[str, Mapping[str, Any]],
    anonymization: Mapping[str, Any],
    **kwargs: Any,
) -> CamouflageBase:
    """Load the frozen SD, the structure ControlNets and the reconstruction ControlNet."""
    frozen = load_frozen_backbone(**backbone)
    controls = build_controls(controlnets, backbone.get("weight_dtype", "fp32"), backbone.get("cache_dir"))
    return CamouflageBase(frozen, controls, dict(anonymization), cache_dir=backbone.get("cache_dir"), **kwargs)


def build_light(
    checkpoint: str,
    weight_dtype: str = "fp32",
    controlnets: Mapping[str, Mapping[str, Any]] | None = None,
    cache_dir: str | None = None,
    **kwargs: Any,
) -> CamouflageLight:
    """Load a training checkpoint's backbone and adapter, plus the optional ControlNets."""
    controls = build_controls(controlnets or {}, weight_dtype, cache_dir)
    return CamouflageLight.from_checkpoint(checkpoint, weight_dtype=weight_dtype, controls=controls, **kwargs)


def image_seed(seed: int, name: str) -> int:
    """A per-image seed from its file name: independent of batch size, order and reruns."""
    return (seed + zlib.crc32(name.encode("utf-8"))) % 2**31


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # anything else is written as PNG


def _save(image: Any, path: Path) -> None:
    """Write atomically: a killed run never leaves a half-written image under its final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fmt = _FORMATS.get(path.suffix.lower(), "PNG")
    image.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    os.replace(tmp, path)


def _done(manifest: Path) -> set[str]:
    if not manifest.is_file():
        return set()
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip().endswith("}")]
    return {row["file"] for row in rows}


def run_anonymization(cfg: DictConfig) -> dict[str, Any]:
    """Anonymize ``cfg.input.folder`` into ``cfg.output`` with ``cfg.model``; return the run's summary."""
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    schema = AttributeSchema.from_config(cfg.attributes)
    sidecar = Path(cfg.persons) if cfg.get("persons") else output / "persons.jsonl"
    if not cfg.get("persons"):
        listing = ImageListing(folder=cfg.input.folder, min_image_size=cfg.input.min_image_size)
        annotate_dataset(
            listing,
            instantiate(cfg.faces),
            sidecar,
            schema.max_persons,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
        )
    source = FolderSource(cfg.input.folder, sidecar, schema=schema.to_config(), min_image_size=cfg.input.min_image_size)
    dataset = PersonImageDataset(source, schema, cfg.resolution, captions=CaptionBuilder(**cfg.captions))
    device = _device(cfg.device)
    model = instantiate(cfg.model)
    if cfg.get("cpu_offload") and device.type == "cuda":
        model.pipe.enable_model_cpu_offload(device=device)
    else:
        model.to(device)
    manifest = output / "manifest.jsonl"
    done = _done(manifest)
    pending = [i for i in range(len(source)) if source.name_of(i) not in done]
    loader = DataLoader(
        Subset(dataset, pending), batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_skipping
    )
    summary: dict[str, Any] = {"done": 0, "skipped": Counter(), "already_done": len(done)}
    latent = cfg.resolution // model.pipe.vae_scale_factor
    with manifest.open("a", encoding="utf-8") as handle:

        def record(row: dict[str, Any]) -> None:
            handle.write(json.dumps(row) + "\n")
            handle.flush()

        for name, reason in source.dropped:
            if name not in done:
                record({"file": name, "status": "skipped", "reason": reason})
                summary["skipped"][reason] += 1
        for batch in tqdm(loader, desc=f"anonymizing ({type(model).__name__})", unit="batch"):
            for name, reason in batch["skipped_items"]:
                record({"file": name, "status": "skipped", "reason": reason})
                summary["skipped"][reason] += 1
            if batch["size"] == 0:
                continue
            images = [TF.to_pil_image((pixels + 1) / 2) for pixels in batch["pixel_values"]]
            seeds = [image_seed(cfg.seed, name) for name in batch["name"]]
            persons = PersonBatch.from_batch(batch)
            if isinstance(model, CamouflageLight):
                outputs = model(images, persons, seeds, list(batch["caption"]))
            else:
                regions = person_region_masks(persons.boxes, persons.mask, (latent, latent), cfg.region_expand)
                outputs = model(
                    images,
                    seeds,
                    prompts=list(batch["caption"]),
                    region_masks=regions.amax(dim=1, keepdim=True).to(device),
                )
            for name, seed, image, count in zip(
                batch["name"], seeds, outputs, persons.mask.sum(1).tolist(), strict=True
            ):
                try:
                    target = inside(output / "images", name)
                except UnsafePathError as error:
                    log.warning("%s: not written", error)
                    record({"file": name, "status": "skipped", "reason": "unsafe output name"})
                    summary["skipped"]["unsafe output name"] += 1
                    continue
                _save(image, target)
                record({"file": name, "status": "done", "seed": seed, "persons": int(count)})
                summary["done"] += 1
    summary["skipped"] = dict(summary["skipped"])
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("anonymization summary: %s", summary)
    return summary
