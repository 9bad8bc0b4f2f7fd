"""Precomputed VAE latents and text-encoder outputs, so training stops re-encoding the same images.

A cache lives in ``<root>/<key>/`` where ``key`` hashes everything its content depends on: the backbone
(id, revision, variant, weight dtype), resolution, crop, flips, caption settings, attribute schema and
the data source's own fingerprint (sidecar checksum, dataset fingerprint). Change any of them and a new
cache is built instead of a stale one being reused. It is written to a temporary folder and renamed
when complete, so a half-built cache is never read.

Per image and per flip variant it stores the latent distribution (mean and std: training can sample or
take the mean), the text-encoder output of the caption, and the padded person arrays. Arrays are ``.npy``
files opened memory-mapped, so datasets larger than RAM stream from disk. Images that cannot be used are
marked invalid with their reason and skipped (and counted) at training time like uncached ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from camouflage_train.data.dataset import PERSON_ARRAY_KEYS, PersonImageDataset, Skipped
from camouflage_train.data.sampling import Draw, SampleKey, generator_for, split_key
from camouflage_train.utils.atomic import atomic_folder

log = logging.getLogger(__name__)

CACHE_FORMAT = 4  # 2: meta.json records every array's byte size; 3: persons' extents; 4: grown before the crop
_NP_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def cache_spec(
    dataset: PersonImageDataset,
    backbone: Mapping[str, Any],
    flip: bool,
    dtype: str,
    source_fingerprint: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every setting the cached tensors depend on (what :func:`cache_key` hashes).

    Args:
        dataset: the training dataset (its source, schema, crop and captions enter the spec).
        backbone: the backbone config (model id, revision, variant, dtype).
        flip: whether both flip variants are cached.
        dtype: the storage precision (``fp16`` or ``fp32``).
        source_fingerprint: the data's fingerprint when ``dataset`` has no source of its own (streamed shards
            record the fingerprint of the source they were written from); ``None``: ``dataset.source``'s.
    """
    return {
        "format": CACHE_FORMAT,
        "backbone": {
            k: backbone.get(k) for k in ("pretrained_model_name_or_path", "revision", "variant", "weight_dtype")
        },
        "resolution": dataset.resolution,
        "random_crop": dataset.random_crop,
        "min_visible": dataset.min_visible,
        "flip": flip,
        "captions": dataset.captions.__dict__,
        "schema": dataset.schema.to_config(),
        "source": dict(source_fingerprint) if source_fingerprint is not None else dataset.source.fingerprint(),
        "dtype": dtype,
    }


def spec_key(spec: Mapping[str, Any]) -> str:
    """The short hash of a :func:`cache_spec`.

    Args:
        spec: the settings.
    """
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(dataset: PersonImageDataset, backbone: Mapping[str, Any], flip: bool, dtype: str) -> str:
    """A short hash of every setting the cached tensors depend on (:func:`cache_spec`).

    Args:
        dataset: the training dataset (its source, schema, crop and captions enter the key).
        backbone: the backbone config (model id, revision, variant, dtype).
        flip: whether both flip variants are cached.
        dtype: the storage precision (``fp16`` or ``fp32``).
    """
    return spec_key(cache_spec(dataset, backbone, flip, dtype))


@torch.no_grad()
def build_cache(
    dataset: PersonImageDataset,
    backbone: Any,
    folder: Path,
    flip: bool,
    dtype: str = "fp16",
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> Path:
    """Encode every sample of ``dataset`` (both flips when ``flip``) with ``backbone``'s VAE and text encoder.

    Args:
        dataset: the samples to encode (fixed crops).
        backbone: a frozen backbone with ``vae``, ``text_encoder`` and ``tokenizer``.
        folder: the cache folder to write (atomically).
        flip: also encode every sample mirrored.
        dtype: the storage precision (``fp16`` or ``fp32``).
        batch_size: images per encoding batch.
        device: where to encode.
    """
    if dataset.random_crop:
        raise ValueError("a latent cache needs a fixed crop: set data.random_crop=false or disable data.cache")
    np_dtype = _NP_DTYPES[dtype]
    flips = (False, True) if flip else (False,)
    n, v = len(dataset), len(flips)
    vae, text_encoder, tokenizer = backbone.vae.to(device), backbone.text_encoder.to(device), backbone.tokenizer
    latent_hw = dataset.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    channels, text_dim = vae.config.latent_channels, text_encoder.config.hidden_size
    with atomic_folder(folder) as staging:
        arrays: dict[str, np.ndarray] = {}

        def array(name: str, shape: tuple[int, ...], np_type: Any) -> np.ndarray:
            arrays[name] = np.lib.format.open_memmap(staging / f"{name}.npy", mode="w+", dtype=np_type, shape=shape)
            return arrays[name]

        p = dataset.schema.max_persons
        array("latent_mean", (n, v, channels, latent_hw, latent_hw), np_dtype)
        array("latent_std", (n, v, channels, latent_hw, latent_hw), np_dtype)
        array("text", (n, v, tokenizer.model_max_length, text_dim), np_dtype)
        array("boxes", (n, v, p, 4), np.float32)
        array("extents", (n, v, p, 4), np.float32)
        array("continuous", (n, v, p, dataset.schema.num_continuous), np.float32)
        array("categorical", (n, v, p, dataset.schema.num_categorical), np.int64)
        array("person_mask", (n, v, p), bool)
        array("persons_dropped", (n, v), np.int64)
        valid = array("valid", (n,), bool)
        reasons: dict[int, str] = {}
        pending: list[tuple[int, list[dict[str, Any]]]] = []

        def flush() -> None:
            items = [item for _, variants in pending for item in variants]
            pixels = torch.stack([item["pixel_values"] for item in items]).to(device, vae.dtype)
            dist = vae.encode(pixels).latent_dist
            ids = tokenizer(
                [item["caption"] for item in items],
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids
            text = text_encoder(ids.to(device))[0]
            for j, (index, variants) in enumerate(pending):
                rows = slice(j * v, (j + 1) * v)
                arrays["latent_mean"][index] = dist.mean[rows].float().cpu().numpy()
                arrays["latent_std"][index] = dist.std[rows].float().cpu().numpy()
                arrays["text"][index] = text[rows].float().cpu().numpy()
                for k, item in enumerate(variants):
                    for key in PERSON_ARRAY_KEYS:
                        arrays[key][index, k] = item[key].numpy()
                    arrays["persons_dropped"][index, k] = item["persons_dropped"]
                valid[index] = True
            pending.clear()

        for index in tqdm(range(n), desc="caching latents", unit="img"):
            result = dataset.variants(index, flips)
            if isinstance(result, Skipped):
                reasons[index] = result.reason
                continue
            pending.append((index, result))
            if len(pending) * v >= batch_size:
                flush()
        if pending:
            flush()
        if not valid.any():
            raise ValueError(f"no usable sample to cache: {dict(Counter(reasons.values()))}")
        for a in arrays.values():
            a.flush()
        arrays.clear()  # close the memory maps before measuring and renaming
        meta = {
            "format": CACHE_FORMAT,
            "size": n,
            "flips": list(flips),
            "dtype": dtype,
            "skipped": {str(i): r for i, r in reasons.items()},
            "skipped_counts": dict(Counter(reasons.values())),
            "sizes": {p.name: p.stat().st_size for p in sorted(staging.glob("*.npy"))},
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("latent cache written to %s (%d images, %d skipped)", folder, n, len(reasons))
    return folder


def cache_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, intact cache (``None`` when it is): a missing ``meta.json`` (the build
    never finished), another format, or an array whose size differs from the one recorded (truncated).

    Args:
        folder: the cache folder.
    """
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return "no meta.json (incomplete build)"
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CACHE_FORMAT:
        return f"cache format {meta.get('format')}, expected {CACHE_FORMAT}"
    for name, size in meta["sizes"].items():
        actual = (folder / name).stat().st_size if (folder / name).is_file() else None
        if actual != size:
            return f"{name} is {actual} bytes, {size} were written"
    return None


class CachedLatentDataset(Dataset):
    """Training samples read from a cache: latents, text embeddings, person arrays; a random flip variant.

    Args:
        folder: a complete cache (see :func:`build_cache`).
        flip_prob: probability of serving the mirrored variant (when it was cached).
    """

    def __init__(self, folder: str | Path, flip_prob: float = 0.0) -> None:
        self.folder = Path(folder)
        problem = cache_problem(self.folder)
        if problem is not None:
            raise ValueError(f"{self.folder} is not a usable latent cache: {problem}")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.flip_prob = flip_prob if len(self.meta["flips"]) == 2 else 0.0
        self.skipped = {int(k): r for k, r in self.meta["skipped"].items()}
        self._arrays: dict[str, np.ndarray] | None = None

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:  # opened lazily, once per worker process
            names = ("latent_mean", "latent_std", "text", *PERSON_ARRAY_KEYS, "persons_dropped", "valid")
            self._arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in names}
        return self._arrays

    def __len__(self) -> int:
        return int(self.meta["size"])

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any] | Skipped:
        """Like :meth:`PersonImageDataset.__getitem__`: the flip variant comes from the key's seed when given."""
        index, seed = split_key(key)
        if index in self.skipped:
            return Skipped(self.skipped[index], f"cache row {index}")
        flip = self.flip_prob > 0 and bool(torch.rand((), generator=generator_for(seed, Draw.FLIP)) < self.flip_prob)
        item = self.item(index, int(flip))
        return {**item, "sample_seed": key[1]} if isinstance(key, tuple) else item

    def item(self, index: int, variant: int) -> dict[str, Any]:
        """Row ``index`` as stored for flip variant ``variant`` (0: as is, 1: mirrored).

        Args:
            index: the cached row.
            variant: 0 (as is) or 1 (mirrored).
        """
        arrays = self._open()
        item = {
            "latent_mean": torch.from_numpy(np.array(arrays["latent_mean"][index, variant], np.float32)),
            "latent_std": torch.from_numpy(np.array(arrays["latent_std"][index, variant], np.float32)),
            "text_embeds": torch.from_numpy(np.array(arrays["text"][index, variant], np.float32)),
        }
        for key in PERSON_ARRAY_KEYS:
            item[key] = torch.from_numpy(np.array(arrays[key][index, variant]))
        item["persons_dropped"] = int(arrays["persons_dropped"][index, variant])
        return item
