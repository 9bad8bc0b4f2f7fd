"""Training data as streamed shards: litdata's optimized chunks on a local disk or in an object store.

Writing (:func:`write_shards`, run by ``make_shards.py``) turns any map-style source of
:mod:`~camouflage_train.data.sources` into two litdata datasets, ``<output>/train`` and ``<output>/val``, split as
:class:`~camouflage_train.data.datamodule.PersonDataModule` splits it (the same seeded ``val_fraction``, or the
``val_source``). Each item is one image: its encoded bytes (a folder's files as they are on disk; decoded sources
as lossless PNG), its person records, caption and names, and its position in the split; with ``latents`` also the
VAE latent distribution, the caption's text embedding and the person arrays of each flip variant, exactly what the
latent cache (:mod:`~camouflage_train.data.cache`) holds, under the same key. ``<output>/camouflage_shards.json``
records what the shards were written from and with: the schema, the source's fingerprint, the split, the image
size stored, the latent spec. litdata's ``optimize`` spreads the work over processes; over machines, each writes its
share of the training split as a part of its own and the last one merges the parts (litdata's ``merge_datasets``).

Reading (:class:`StreamingPersonDataModule`, ``data=streaming``) streams those chunks from the path or URI,
sharded over ranks, nodes and loader workers by litdata and shuffled chunk-wise, and passes every item through
the map-style path's own transforms (:meth:`~camouflage_train.data.dataset.PersonImageDataset.prepare`): the same
crop, flip, person handling and captions. Every random decision about an item comes from
:func:`~camouflage_train.data.sampling.sample_seed` of the run's seed, the epoch and the item's position in its
split, as in the map-style path, so an item is treated the same however many processes read it and whichever
order they read in. The loader's position is part of every checkpoint (litdata's ``state_dict``, saved and
restored by Lightning's fit loop), so a killed run resumes at the next unseen item.

What goes wrong is said before training starts, or counted: shards written for another schema, at a smaller
image size than the run's resolution, or with latents of other settings than the run's are refused when the data
module is built; an item whose bytes do not decode, or that litdata cannot read, is skipped and counted like a bad
row of a map-style source (``data/train_skipped``).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, merge_datasets, optimize
from litdata.streaming.sampler import ChunkedIndex
from torch.utils.data import Dataset, Subset

from camouflage_train.compat.data_internals import shard_store
from camouflage_train.data.cache import _NP_DTYPES, cache_spec, spec_key
from camouflage_train.data.dataset import (
    PERSON_ARRAY_KEYS,
    CaptionBuilder,
    PersonImageDataset,
    Skipped,
    collate_skipping,
)
from camouflage_train.data.images import BadSampleError, load_rgb
from camouflage_train.data.sampling import Draw, KeyedSubset, generator_for, sample_seed
from camouflage_train.data.schema import AttributeSchema, as_schema
from camouflage_train.data.sources import RawSample, read_raw
from camouflage_train.errors import DataError

log = logging.getLogger(__name__)

SHARDS_FORMAT = 1
META_NAME = "camouflage_shards.json"


def _join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI (``s3://bucket/prefix``)."""
    return "/".join([root.rstrip("/"), *parts])


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def shards_exist(output: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``output`` (a folder or URI) already holds finished shards (their ``camouflage_shards.json``).

    Args:
        output: the shards' folder or URI.
        storage_options: the object store's options.
    """
    if _is_remote(output):
        return bool(shard_store(output, storage_options).exists(_join(output, META_NAME)))
    return Path(output, META_NAME).exists()


def read_shards_meta(input_dir: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``camouflage_shards.json`` of shards written by :func:`write_shards`.

    Args:
        input_dir: the shards' folder or URI.
        storage_options: the object store's options (endpoint, credentials), as litdata takes them.
    """
    where = _join(input_dir, META_NAME)
    try:
        if _is_remote(input_dir):
            with tempfile.TemporaryDirectory() as folder:
                local = os.path.join(folder, META_NAME)
                shard_store(input_dir, storage_options).download_file(where, local)
                text = Path(local).read_text()
        else:
            text = Path(where).read_text()
    except Exception as error:  # a missing file reads differently on every store
        raise DataError(
            f"data.input_dir: {where} cannot be read ({type(error).__name__}: {str(error)[:200]}); shards are written "
            "by `python make_shards.py data=<your data config> output=<folder or URI>`, which writes this file last"
        ) from error
    meta = json.loads(text)
    if meta.get("format") != SHARDS_FORMAT:
        raise DataError(
            f"{where}: shards format {meta.get('format')}, this version reads {SHARDS_FORMAT}; write them again with "
            "make_shards.py"
        )
    return meta


def _encoded(image: Any) -> bytes:
    """A decoded image as lossless PNG bytes (its pixels come back exactly)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _resized(image: Any, shorter_side: int) -> Any:
    """``image`` scaled down (never up) so that its shorter side is ``shorter_side``."""
    from PIL import Image

    width, height = image.size
    if min(width, height) <= shorter_side:
        return image
    scale = shorter_side / min(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)


class ShardWriter:
    """What ``optimize`` runs on each batch of positions of one split: the items, one per image.

    Picklable (litdata starts its workers by ``spawn``); the encoders, when latents are written, load once per worker.

    Args:
        dataset: the split's transforms and source (a :class:`PersonImageDataset`).
        indices: the split's source index of each position.
        shorter_side: store images scaled down to this shorter side (``None``: as they are).
        latents: ``{backbone, dtype, flip, encoder_loader, device}`` to store the latent-cache tensors too.
    """

    def __init__(
        self,
        dataset: PersonImageDataset,
        indices: Sequence[int],
        shorter_side: int | None = None,
        latents: Mapping[str, Any] | None = None,
    ) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.shorter_side, self.latents = shorter_side, dict(latents) if latents else None
        self._backbone: Any = None

    def _record(self, position: int) -> tuple[bytes, dict[str, Any]]:
        index = self.indices[position]
        source = self.dataset.source
        try:
            raw = read_raw(source, index)
        except BadSampleError as error:  # kept as an item: counted where it is read, like a bad row
            return b"", {"skipped": error.reason, "key": self.dataset._name(index)}
        image = raw.image
        if isinstance(image, bytes) and self.shorter_side is None:
            data = image
        else:
            try:
                decoded = load_rgb(image, getattr(source, "min_image_size", 1))
            except BadSampleError as error:
                return b"", {"skipped": error.reason, "key": raw.key}
            data = _encoded(_resized(decoded, self.shorter_side) if self.shorter_side else decoded)
        record = {
            "persons": raw.persons,
            "caption": raw.caption,
            "key": raw.key,
            "name": raw.name,
            "persons_not_recorded": raw.persons_not_recorded,
        }
        return data, record

    def __call__(self, positions: Sequence[int]) -> Iterator[dict[str, Any]]:
        items = []
        for position in positions:
            data, record = self._record(position)
            items.append({"index": int(position), "image": data, "record": json.dumps(record)})
        if self.latents is not None:
            self._add_latents(items)
        yield from items

    @torch.no_grad()
    def _add_latents(self, items: list[dict[str, Any]]) -> None:
        settings = self.latents
        assert settings is not None
        if self._backbone is None:
            # One thread per writer process, as in DataLoader workers: more processes use more cores, and a forked
            # process must not enter the OpenMP pool it inherited from its parent (it would wait on it forever).
            torch.set_num_threads(1)
            self._backbone = settings["encoder_loader"](**{**settings["backbone"], "with_unet": False})
            self._backbone.vae.to(settings["device"])
            self._backbone.text_encoder.to(settings["device"])
        backbone, device = self._backbone, settings["device"]
        flips = (False, True) if settings["flip"] else (False,)
        np_dtype, p, schema = _NP_DTYPES[settings["dtype"]], self.dataset.schema.max_persons, self.dataset.schema
        latent_hw = self.dataset.resolution // (2 ** (len(backbone.vae.config.block_out_channels) - 1))
        shapes = {
            "latent_mean": ((len(flips), backbone.vae.config.latent_channels, latent_hw, latent_hw), np_dtype),
            "latent_std": ((len(flips), backbone.vae.config.latent_channels, latent_hw, latent_hw), np_dtype),
            "text": ((len(flips), backbone.tokenizer.model_max_length, backbone.text_encoder.config.hidden_size),
                     np_dtype),
            "boxes": ((len(flips), p, 4), np.float32),
            "extents": ((len(flips), p, 4), np.float32),
            "continuous": ((len(flips), p, schema.num_continuous), np.float32),
            "categorical": ((len(flips), p, schema.num_categorical), np.int64),
            "person_mask": ((len(flips), p), bool),
            "persons_dropped": ((len(flips),), np.int64),
        }  # fmt: skip
        usable: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        min_size = getattr(self.dataset.source, "min_image_size", 1)
        for item in items:
            for name, (shape, dtype) in shapes.items():  # every item has every array (litdata's fixed layout)
                item[name] = np.zeros(shape, dtype)
            item["latents_valid"] = False
            record = json.loads(item["record"])
            if record.get("skipped"):
                continue
            variants = self.dataset._variants(lambda item=item: _raw_sample(item, min_size), record["key"], flips, None)
            if isinstance(variants, Skipped):
                continue
            usable.append((item, variants))
        if not usable:
            return
        rows = [variant for _, variants in usable for variant in variants]
        pixels = torch.stack([row["pixel_values"] for row in rows]).to(device, backbone.vae.dtype)
        dist = backbone.vae.encode(pixels).latent_dist
        tokens = backbone.tokenizer(
            [row["caption"] for row in rows],
            padding="max_length",
            truncation=True,
            max_length=backbone.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        text = backbone.text_encoder(tokens.to(device))[0]
        v = len(flips)
        for j, (item, variants) in enumerate(usable):
            rows_of = slice(j * v, (j + 1) * v)
            item["latent_mean"] = dist.mean[rows_of].float().cpu().numpy().astype(np_dtype)
            item["latent_std"] = dist.std[rows_of].float().cpu().numpy().astype(np_dtype)
            item["text"] = text[rows_of].float().cpu().numpy().astype(np_dtype)
            for k, variant in enumerate(variants):
                for key in PERSON_ARRAY_KEYS:
                    item[key][k] = variant[key].numpy()
                item["persons_dropped"][k] = variant["persons_dropped"]
            item["latents_valid"] = True


def _raw_sample(item: Mapping[str, Any], min_image_size: int) -> RawSample:
    """The :class:`RawSample` an item holds; its image decoded (``BadSampleError`` when it does not decode)."""
    record = json.loads(item["record"])
    if record.get("skipped"):
        raise BadSampleError(record["skipped"], f"{record.get('key')} (found when the shards were written)")
    return RawSample(
        image=load_rgb(bytes(item["image"]), min_image_size),
        persons=list(record["persons"]),
        caption=record.get("caption"),
        key=record["key"],
        name=record.get("name", ""),
        persons_not_recorded=int(record.get("persons_not_recorded", 0)),
    )


def split_of(datamodule: Any) -> dict[str, tuple[PersonImageDataset, list[int]]]:
    """The train and validation splits a map-style data module trains on, as ``(dataset, source indices)``.

    Args:
        datamodule: a set-up :class:`~camouflage_train.data.datamodule.PersonDataModule`.
    """
    found: dict[str, tuple[PersonImageDataset, list[int]]] = {}
    for name, part in (("train", datamodule.train_set), ("val", datamodule.val_set)):
        if isinstance(part, (KeyedSubset, Subset)):
            dataset, indices = part.dataset, list(part.indices)
        else:
            dataset, indices = part, list(range(len(part)))
        if not isinstance(dataset, PersonImageDataset):
            raise DataError(
                f"the {name} split is not read from images ({type(dataset).__name__}): set data.cache.enabled=false "
                "(latents go into shards with latents=true)"
            )
        found[name] = (dataset, indices)
    return found


def write_shards(
    datamodule: Any,
    output: str,
    num_workers: int = 1,
    chunk_bytes: str = "64MB",
    shorter_side: int | None = None,
    latents: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
    start_method: str | None = None,
    num_nodes: int = 1,
    node_rank: int = 0,
    merge_timeout_s: float = 86400.0,
) -> dict[str, Any]:
    """Write the data module's train and validation splits as litdata shards under ``output``; return the meta.

    With ``num_nodes > 1`` every machine runs this with its ``node_rank`` and writes its share of the training
    split as a part of its own under the shared ``output``; the last machine waits for every part, merges them, writes
    the validation split and only then ``camouflage_shards.json``, after checking that every split's index holds all
    its items (never shards with fewer items).

    Args:
        datamodule: a :class:`~camouflage_train.data.datamodule.PersonDataModule` (not set up yet, or set up).
        output: a local folder or an object-store URI (``s3://bucket/prefix``, ``gs://``, ...).
        num_workers: writer processes on this machine.
        chunk_bytes: the largest chunk (litdata's ``chunk_bytes``).
        shorter_side: store images scaled down to this shorter side (``None``: the source's bytes as they are).
        latents: ``{backbone, dtype, encoder_loader, device}`` to also store what the latent cache holds.
        storage_options: the object store's options (endpoint, credentials).
        overwrite: replace shards already at ``output``.
        batch_size: images per writer call (and per encoding batch with ``latents``).
        start_method: how litdata starts its writer processes (``None``: its default, ``spawn``; ``fork`` starts
            them at once but cannot encode latents on a GPU).
        num_nodes: machines writing together.
        node_rank: this machine's place among them.
        merge_timeout_s: how long the last machine waits for the others' parts.
    """
    if datamodule.cache.get("enabled"):  # the shards are written from the images; ``latents`` adds the encodings
        datamodule.cache = {**datamodule.cache, "enabled": False}
    datamodule.setup("fit")
    splits = split_of(datamodule)
    train_dataset = splits["train"][0]
    if shorter_side is not None and shorter_side < datamodule.resolution:
        raise DataError(
            f"shorter_side={shorter_side} is below data.resolution={datamodule.resolution}: training would upscale "
            "every image; store at least the training resolution"
        )
    spec = None
    if latents is not None:
        if train_dataset.random_crop:
            raise DataError("latents=true stores fixed crops: set data.random_crop=false")
        latents = {**latents, "flip": datamodule.flip_prob > 0}
        spec = cache_spec(train_dataset, latents["backbone"], latents["flip"], latents["dtype"])
        if shorter_side is not None:  # encoded from the stored, scaled-down images: not the map-style cache's
            spec["shorter_side"] = shorter_side
    meta: dict[str, Any] = {
        "format": SHARDS_FORMAT,
        "schema": train_dataset.schema.to_config(),
        "min_image_size": getattr(train_dataset.source, "min_image_size", 1),
        "shorter_side": shorter_side,
        "latents": {"spec": spec, "key": spec_key(spec)} if spec is not None else None,
        "splits": {},
    }
    # litdata's optimize sets the process-wide start method for its writers; the caller's own process pools (a
    # DataLoader started later in this process) keep theirs.
    start_method_before = multiprocessing.get_start_method(allow_none=True)
    try:
        _write_splits(splits, output, meta, num_workers, chunk_bytes, shorter_side, latents, storage_options,
                      overwrite, batch_size, start_method, num_nodes, node_rank, merge_timeout_s)  # fmt: skip
    finally:
        multiprocessing.set_start_method(start_method_before, force=True)
    if node_rank == num_nodes - 1:
        for name, split in meta["splits"].items():
            indexed = indexed_items(_join(output, name), storage_options)
            if indexed != split["items"]:
                raise DataError(
                    f"{_join(output, name)}: its index holds {indexed} of the split's {split['items']} items; write "
                    "the shards again into an empty output"
                )
        _write_meta(output, meta, storage_options)
    return meta


def _part_dir(output: str, split: str, node_rank: int) -> str:
    return _join(output, "parts", split, f"node-{node_rank:05d}")


def _mark_done(output: str, split: str, node_rank: int, items: int, storage: Mapping[str, Any] | None) -> None:
    """The marker a machine writes when its part of ``split`` is complete."""
    text, where = json.dumps({"items": items}), _part_dir(output, split, node_rank) + ".done.json"
    if _is_remote(output):
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "done.json").write_text(text)
            shard_store(output, storage).upload_file(str(Path(folder, "done.json")), where)
    else:
        Path(where).parent.mkdir(parents=True, exist_ok=True)
        Path(where).write_text(text)


def _is_done(output: str, split: str, node_rank: int, storage: Mapping[str, Any] | None) -> bool:
    where = _part_dir(output, split, node_rank) + ".done.json"
    return bool(shard_store(output, storage).exists(where)) if _is_remote(output) else Path(where).exists()


def _write_splits(
    splits: Mapping[str, tuple[PersonImageDataset, list[int]]],
    output: str,
    meta: dict[str, Any],
    num_workers: int,
    chunk_bytes: str,
    shorter_side: int | None,
    latents: Mapping[str, Any] | None,
    storage_options: Mapping[str, Any] | None,
    overwrite: bool,
    batch_size: int,
    start_method: str | None,
    num_nodes: int = 1,
    node_rank: int = 0,
    merge_timeout_s: float = 86400.0,
) -> None:
    """Each split with litdata's ``optimize``. On several machines the training split is shared out: each writes its
    batches as a dataset of its own under ``<output>/parts/train/``, marks it done, and the last machine waits for
    every mark, merges the parts into ``<output>/train`` (litdata's ``merge_datasets``: chunks renamed and copied,
    server-side on an object store) and removes them; the validation split, small, is written by the last machine."""
    last = node_rank == num_nodes - 1
    for name, (dataset, indices) in splits.items():
        meta["source" if name == "train" else "val_source"] = dataset.source.fingerprint()
        meta["splits"][name] = {"items": len(indices), "skipped_before": dict(dataset.source.skipped)}
        positions = list(range(len(indices)))
        batches = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
        writer = ShardWriter(dataset, indices, shorter_side, latents if name == "train" else None)
        options = {
            "chunk_bytes": chunk_bytes, "num_workers": num_workers, "keep_data_ordered": True, "verbose": False,
            "storage_options": dict(storage_options or {}), "start_method": start_method,
        }  # fmt: skip
        if num_nodes == 1 or name != "train":
            if last:
                optimize(fn=writer, inputs=batches, output_dir=_join(output, name),
                         mode="overwrite" if overwrite else None, **options)  # fmt: skip
            continue
        if len(batches) < num_nodes:
            raise DataError(
                f"the training split has {len(batches)} batch(es) of batch_size={batch_size} for num_nodes={num_nodes} "
                "machines; use fewer machines or a smaller batch_size"
            )
        mine = batches[node_rank::num_nodes]
        optimize(fn=writer, inputs=mine, output_dir=_part_dir(output, name, node_rank), mode="overwrite", **options)
        _mark_done(output, name, node_rank, sum(len(b) for b in mine), storage_options)
        if not last:
            continue
        deadline = time.monotonic() + merge_timeout_s
        while not all(_is_done(output, name, rank, storage_options) for rank in range(num_nodes)):
            if time.monotonic() > deadline:
                missing = [r for r in range(num_nodes) if not _is_done(output, name, r, storage_options)]
                raise DataError(f"{output}: machines {missing} did not finish their part within {merge_timeout_s} s")
            time.sleep(10)
        parts = [_part_dir(output, name, rank) for rank in range(num_nodes)]
        merge_datasets(parts, _join(output, name), storage_options=dict(storage_options or {}))
        if _is_remote(output):
            shard_store(output, storage_options).delete_file_or_directory(_join(output, "parts", name))
        else:
            shutil.rmtree(_join(output, "parts", name))
            if not any(Path(output, "parts").iterdir()):
                Path(output, "parts").rmdir()


def indexed_items(split_dir: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """How many items litdata's ``index.json`` of one split lists.

    Args:
        split_dir: the split's folder or URI.
        storage_options: the object store's options.
    """
    where = _join(split_dir, "index.json")
    if _is_remote(split_dir):
        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, "index.json")
            shard_store(split_dir, storage_options).download_file(where, local)
            index = json.loads(Path(local).read_text())
    else:
        index = json.loads(Path(where).read_text())
    return sum(int(chunk["chunk_size"]) for chunk in index["chunks"])


def _write_meta(output: str, meta: Mapping[str, Any], storage_options: Mapping[str, Any] | None) -> None:
    """``camouflage_shards.json``, written last: shards without it were not finished."""
    text = json.dumps(meta, indent=2, default=str)
    if _is_remote(output):
        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, META_NAME)
            Path(local).write_text(text)
            shard_store(output, storage_options).upload_file(local, _join(output, META_NAME))
    else:
        Path(output, META_NAME).write_text(text)


class PersonShardDataset(StreamingDataset):
    """One split's shards, each item through the map-style transforms (see the module docstring).

    Args:
        input_dir: the split's folder or URI.
        transforms: the transforms (a :class:`PersonImageDataset` without a source).
        seed: the run's data seed: the chunk order and every item's seed.
        shuffle: shuffle chunks and items (training) or read in order (validation).
        draw_seeds: give every item its :func:`sample_seed` (training); ``False``: no seed (validation).
        min_image_size: images with a shorter side are skipped (the source's setting, recorded in the meta).
        latents: serve the stored latent-cache tensors instead of decoding the image.
        flip_prob: with ``latents``, the probability of the mirrored variant.
        **kwargs: litdata's ``StreamingDataset`` options (``cache_dir``, ``max_cache_size``, ``storage_options``).
    """

    def __init__(
        self,
        input_dir: str,
        transforms: PersonImageDataset,
        seed: int,
        shuffle: bool,
        draw_seeds: bool,
        min_image_size: int = 1,
        latents: bool = False,
        flip_prob: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(input_dir=input_dir, shuffle=shuffle, seed=seed, **kwargs)
        self.person_transforms, self.data_seed, self.draw_seeds = transforms, seed, draw_seeds
        self.min_image_size, self.latents, self.flip_prob = min_image_size, latents, flip_prob
        self._warned = False

    def __getitem__(self, index: Any) -> dict[str, Any] | Skipped:
        at = index.index if isinstance(index, ChunkedIndex) else index
        try:
            item = super().__getitem__(index)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError) as error:
            if not self._warned:
                self._warned = True
                log.warning("skipping an unreadable shard item (%s: %s); further ones are only counted",
                            type(error).__name__, str(error)[:200])  # fmt: skip
            return Skipped("unreadable shard item", f"{self.input_dir.url or self.input_dir.path} item {at}")
        # litdata counts epochs from 1, Lightning (and the map-style sampler) from 0
        seed = sample_seed(self.data_seed, self.current_epoch - 1, int(item["index"])) if self.draw_seeds else None
        if self.latents:
            return self._cached(item, seed, at)
        return self.person_transforms.prepare(
            lambda: _raw_sample(item, self.min_image_size), seed, f"shard item {item['index']}"
        )

    def _cached(self, item: Mapping[str, Any], seed: int | None, at: Any) -> dict[str, Any] | Skipped:
        if not bool(item["latents_valid"]):
            record = json.loads(item["record"])
            return Skipped(record.get("skipped") or "not encoded", record.get("key", f"item {at}"))
        variants = int(np.asarray(item["latent_mean"]).shape[0])
        flip = variants == 2 and self.flip_prob > 0
        flip = flip and bool(torch.rand((), generator=generator_for(seed, Draw.FLIP)) < self.flip_prob)
        out = {
            "latent_mean": torch.from_numpy(np.array(item["latent_mean"][int(flip)], np.float32)),
            "latent_std": torch.from_numpy(np.array(item["latent_std"][int(flip)], np.float32)),
            "text_embeds": torch.from_numpy(np.array(item["text"][int(flip)], np.float32)),
            "persons_dropped": int(item["persons_dropped"][int(flip)]),
        }
        for key in PERSON_ARRAY_KEYS:
            out[key] = torch.from_numpy(np.array(item[key][int(flip)]))
        return {**out, "sample_seed": seed} if seed is not None else out


class PersonShardLoader(StreamingDataLoader):
    """litdata's loader, resumed for exactly one epoch.

    After ``load_state_dict`` litdata's loader continues the restored epoch and clears its ``restore`` flag only
    when that epoch's iterator runs to its end; Lightning, which knows the loader's length, stops after the epoch's
    last batch without reaching that end, so the next epoch would resume the restored one again (its left-over
    items, its seeds). Here the flag holds for the first iteration after a restore only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restored_epoch_started = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._restored_epoch_started = False

    def __iter__(self) -> Any:
        if self.restore and self._restored_epoch_started:
            self.restore = False  # the restored epoch has been iterated: this is a new one
        self._restored_epoch_started = self.restore
        return super().__iter__()


class StreamingPersonDataModule(L.LightningDataModule):
    """Train/val loaders streaming the shards :func:`write_shards` wrote (``data=streaming``).

    The shards' record is checked when the module is built, before any model trains: another schema, a stored
    image size below ``resolution``, or (with ``cache.enabled``) latents of other settings are refused.

    Args:
        input_dir: the shards' folder or URI (what ``make_shards.py`` wrote: ``train/``, ``val/``, the record).
        schema: the attribute schema (must be the one the shards were written with).
        resolution: the square training resolution in pixels.
        random_crop: crop training images at random (validation always crops centrally).
        flip_prob: probability of a horizontal flip of a training image.
        min_visible: a person whose box keeps less than this share inside the crop is dropped.
        captions: :class:`~camouflage_train.data.dataset.CaptionBuilder` settings.
        batch_size: training images per process and step.
        val_batch_size: validation images per batch (default ``batch_size``).
        num_workers: loader worker processes.
        pin_memory: page-locked host batches.
        seed: the chunk order and every item's randomness derive from it.
        shuffle: shuffle the training items every epoch.
        cache_dir: where remote chunks are kept while read (``None``: litdata's default).
        max_cache_size: the most disk those chunks may take.
        storage_options: the object store's options (endpoint, credentials), as litdata takes them.
        cache: ``{enabled, dtype, backbone}``: train from the latents stored in the shards (written with
            ``latents=true`` under the same settings).
    """

    def __init__(
        self,
        input_dir: str,
        schema: AttributeSchema | Mapping[str, Any],
        resolution: int,
        random_crop: bool = True,
        flip_prob: float = 0.5,
        min_visible: float = 0.5,
        captions: Mapping[str, Any] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        cache_dir: str | None = None,
        max_cache_size: str = "50GB",
        storage_options: Mapping[str, Any] | None = None,
        cache: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.input_dir, self.schema, self.resolution = str(input_dir), as_schema(schema), resolution
        self.random_crop, self.flip_prob, self.min_visible = random_crop, flip_prob, min_visible
        self.captions = CaptionBuilder(**dict(captions or {}))
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.seed, self.shuffle = seed, shuffle
        self.stream_options = {
            "cache_dir": cache_dir,
            "max_cache_size": max_cache_size,
            "storage_options": dict(storage_options or {}),
        }
        self.cache = dict(cache or {})
        self.meta = read_shards_meta(self.input_dir, storage_options)
        self._check_meta()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _transforms(self, train: bool) -> PersonImageDataset:
        return PersonImageDataset(
            None,  # the items are read from the shards
            self.schema,
            self.resolution,
            random_crop=self.random_crop and train,
            flip_prob=self.flip_prob if train else 0.0,
            min_visible=self.min_visible,
            captions=self.captions,
        )

    def _check_meta(self) -> None:
        where = _join(self.input_dir, META_NAME)
        meta = self.meta
        wanted = json.loads(json.dumps(self.schema.to_config()))  # as the record holds it (tuples become lists)
        if meta["schema"] != wanted:
            stored = meta["schema"]
            keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise DataError(
                f"{where}: the shards were written for another attribute schema (differs in: {', '.join(keys)}); "
                "use the attributes config they were written with, or write them again with make_shards.py"
            )
        stored_side = meta.get("shorter_side")
        if stored_side is not None and stored_side < self.resolution:
            raise DataError(
                f"{where}: images are stored at shorter side {stored_side}, below data.resolution={self.resolution} "
                "(training would upscale them); lower data.resolution or write the shards with a larger shorter_side"
            )
        if self.cache.get("enabled"):
            latents = meta.get("latents")
            if latents is None:
                raise DataError(
                    f"data.cache.enabled=true but {where} holds no latents; write the shards with latents=true, or "
                    "set data.cache.enabled=false"
                )
            if self.random_crop:
                raise DataError(
                    "data.cache.enabled=true needs data.random_crop=false (the stored latents are fixed crops)"
                )
            spec = cache_spec(
                self._transforms(train=True),
                self.cache.get("backbone") or {},
                self.flip_prob > 0,
                self.cache.get("dtype", "fp16"),
                source_fingerprint=meta["source"],
            )
            if meta.get("shorter_side") is not None:
                spec["shorter_side"] = meta["shorter_side"]
            if spec_key(spec) != latents["key"]:
                stored = latents["spec"]
                keys = sorted(k for k in set(stored) | set(spec) if stored.get(k) != spec.get(k))
                raise DataError(
                    f"{where}: the stored latents were made with other settings (differs in: {', '.join(keys)}); "
                    "match them, set data.cache.enabled=false (decode the stored images), or write the shards again"
                )

    def _dataset(self, split: str, train: bool) -> Dataset:
        return PersonShardDataset(
            _join(self.input_dir, split),
            self._transforms(train),
            seed=self.seed,
            shuffle=self.shuffle and train,
            draw_seeds=train,
            min_image_size=int(self.meta.get("min_image_size", 1)),
            latents=bool(self.cache.get("enabled")) and train,
            flip_prob=self.flip_prob if train else 0.0,
            drop_last=train,
            **self.stream_options,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._dataset("train", train=True)
        if self.val_set is None and self.meta["splits"].get("val", {}).get("items"):
            self.val_set = self._dataset("val", train=False)

    def _loader(self, dataset: Dataset, batch_size: int, drop_last: bool) -> Any:
        # Workers start anew every epoch: a persistent litdata worker keeps the epoch count it reached itself, which
        # an epoch cut short (limit_train_batches) leaves behind, and with it every item's seed.
        return PersonShardLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_skipping,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            drop_last=drop_last,
        )

    def train_dataloader(self) -> Any:
        """The training split, shuffled chunk-wise per epoch and sharded over ranks, nodes and workers by litdata;
        its position is saved with every checkpoint and restored on resume."""
        assert self.train_set is not None, "call setup() first"
        return self._loader(self.train_set, self.batch_size, drop_last=True)

    def val_dataloader(self) -> Any:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, drop_last=False)

    def test_dataloader(self) -> Any:
        """The validation split, in order."""
        return self.val_dataloader()
