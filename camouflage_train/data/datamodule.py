"""LightningDataModule over any :mod:`~camouflage_train.data.sources` source."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from camouflage_train.data.dataset import CaptionBuilder, PersonImageDataset, collate_skipping
from camouflage_train.data.sampling import KeyedSubset, ResumableLoader, ResumableSampler
from camouflage_train.data.schema import AttributeSchema, as_schema
from camouflage_train.data.sources import SampleSource
from camouflage_train.errors import DataError

log = logging.getLogger(__name__)


class PersonDataModule(L.LightningDataModule):
    """Train/val loaders of person-annotated images.

    Validation uses ``val_source`` when given, else a seeded ``val_fraction`` split of ``train_source``;
    it never crops randomly or flips, so its loss is comparable across runs. ``train_source=None`` with a
    ``val_source`` builds only the validation split (evaluation reads nothing else).

    Args:
        train_source: the training images and their sidecars (``None``: validation/evaluation only).
        schema: the attribute schema (or its config).
        resolution: the square training resolution in pixels.
        val_source: the validation images; ``None`` splits ``val_fraction`` off ``train_source``.
        val_fraction: the seeded share of ``train_source`` used for validation when ``val_source`` is ``None``.
        random_crop: crop training images at random (validation always crops centrally).
        flip_prob: probability of a horizontal flip of a training image (boxes and yaw flip with it).
        min_visible: a person whose box keeps less than this share inside the crop is dropped.
        captions: :class:`~camouflage_train.data.dataset.CaptionBuilder` settings.
        batch_size: training images per process and step.
        val_batch_size: validation images per batch (default ``batch_size``).
        num_workers: DataLoader worker processes.
        persistent_workers: keep the workers between epochs (with ``num_workers > 0``).
        pin_memory: page-locked host batches (faster copies to a GPU).
        split_seed: the seed of the ``val_fraction`` split.
        cache: ``{enabled, root, dtype, batch_size, backbone}`` to train from precomputed latents and text
            embeddings (see :mod:`camouflage_train.data.cache`); ``backbone`` is the model's backbone config.
        seed: the training order and every sample's randomness derive from it (see
            :mod:`camouflage_train.data.sampling`).
        encoder_loader: builds the frozen VAE and text encoder that fill the cache, called with ``backbone``'s
            keys and ``with_unet=False`` (the data configs pass
            :func:`~camouflage_train.models.backbone.load_frozen_backbone`); needed only when the cache is built.
    """

    def __init__(
        self,
        train_source: SampleSource | None,
        schema: AttributeSchema | Mapping[str, Any],
        resolution: int,
        val_source: SampleSource | None = None,
        val_fraction: float = 0.05,
        random_crop: bool = True,
        flip_prob: float = 0.5,
        min_visible: float = 0.5,
        captions: Mapping[str, Any] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        split_seed: int = 0,
        cache: Mapping[str, Any] | None = None,
        seed: int = 0,
        encoder_loader: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        if train_source is None and val_source is None:
            raise ValueError("PersonDataModule needs a train_source, a val_source, or both")
        self.cache = dict(cache or {})
        if self.cache.get("enabled") and random_crop:
            raise ValueError("data.cache.enabled=true needs data.random_crop=false (cached latents are fixed crops)")
        self.schema = as_schema(schema)
        self.train_source, self.val_source = train_source, val_source
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.resolution, self.random_crop, self.flip_prob, self.min_visible = (
            resolution,
            random_crop,
            flip_prob,
            min_visible,
        )
        self.captions = CaptionBuilder(**dict(captions or {}))
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.seed, self.encoder_loader = seed, encoder_loader
        self.loader_kwargs = {
            "collate_fn": collate_skipping,
            "num_workers": num_workers,
            "persistent_workers": persistent_workers and num_workers > 0,
            "pin_memory": pin_memory,
        }
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._split_note = ""  # how the training rows were obtained, for errors

    def _dataset(self, source: SampleSource, train: bool) -> PersonImageDataset:
        return PersonImageDataset(
            source,
            self.schema,
            self.resolution,
            random_crop=self.random_crop and train,
            flip_prob=self.flip_prob if train else 0.0,
            min_visible=self.min_visible,
            captions=self.captions,
        )

    def cache_folder(self) -> Path:
        """Where this data's latent cache lives (its name hashes every setting it depends on)."""
        from camouflage_train.data.cache import cache_key

        dataset = self._dataset(self.train_source, train=True)
        key = cache_key(dataset, self.cache["backbone"], self.flip_prob > 0, self.cache.get("dtype", "fp16"))
        return Path(self.cache["root"]) / key

    def prepare_data(self) -> None:
        """Build the latent cache if it is enabled and missing (Lightning runs this on one process per node)."""
        if not self.cache.get("enabled") or self.train_source is None:
            return
        from camouflage_train.data.cache import build_cache, cache_problem

        folder = self.cache_folder()
        problem = cache_problem(folder) if folder.exists() else "missing"
        if problem is None:
            log.info("using latent cache %s", folder)
            return
        if folder.exists():
            log.warning("rebuilding latent cache %s: %s", folder, problem)
            shutil.rmtree(folder)
        if self.encoder_loader is None:
            raise ValueError(
                "data.cache.enabled=true: building the latent cache needs the model's encoders; pass "
                "encoder_loader=camouflage_train.models.backbone.load_frozen_backbone to PersonDataModule"
            )
        backbone = self.encoder_loader(**{**self.cache["backbone"], "with_unet": False})
        device = "cuda" if torch.cuda.is_available() else "cpu"
        build_cache(
            self._dataset(self.train_source, train=True),
            backbone,
            folder,
            flip=self.flip_prob > 0,
            dtype=self.cache.get("dtype", "fp16"),
            batch_size=int(self.cache.get("batch_size", 16)),
            device=device,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or self.val_set is not None:
            return
        if self.train_source is None:  # validation/evaluation only
            self.val_set = self._dataset(self.val_source, train=False)
            return
        train: Dataset = self._dataset(self.train_source, train=True)
        if self.cache.get("enabled"):
            from camouflage_train.data.cache import CachedLatentDataset

            train = CachedLatentDataset(self.cache_folder(), flip_prob=self.flip_prob)
        if self.val_source is not None:
            self.train_set, self.val_set = train, self._dataset(self.val_source, train=False)
            self._split_note = f"{len(train)} usable rows in data.train_source (validation: data.val_source)"
            return
        n_val = round(len(train) * self.val_fraction)
        if n_val == 0 or n_val >= len(train):
            raise DataError(
                f"data.val_fraction={self.val_fraction} of {len(train)} usable rows leaves no train or no val "
                "split; set data.val_fraction or give data.val_source"
            )
        self._split_note = (
            f"{len(train)} usable rows, of which data.val_fraction={self.val_fraction} -> {n_val} for validation "
            f"and {len(train) - n_val} for training"
        )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        self.train_set = KeyedSubset(train, order[n_val:])
        self.val_set = Subset(self._dataset(self.train_source, train=False), order[:n_val])

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from ``seed``, sharded over ranks; resumes mid-epoch where a checkpoint left off
        (:class:`~camouflage_train.data.sampling.ResumableLoader`)."""
        if self.train_source is None:
            raise DataError("this data module was built without data.train_source: it can only validate")
        assert self.train_set is not None, "call setup() first"
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(len(self.train_set), self.seed, num_replicas=world, rank=rank, drop_last=True)
        if sampler.num_samples < self.batch_size:
            raise DataError(
                f"no full training batch: {self._split_note}; over {world} process(es) that is "
                f"{sampler.num_samples} per process, fewer than data.batch_size={self.batch_size} "
                "(drop_last=True drops an incomplete batch, so no optimizer step would run). Lower "
                "data.batch_size or data.val_fraction, or add data"
            )
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)  # the loader's checkpointed state continues a resumed epoch
        return ResumableLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True, **self.loader_kwargs
        )

    def test_dataloader(self) -> DataLoader:
        """The validation split, in order: evaluation sees every image once, deterministically."""
        return self.val_dataloader()

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, **self.loader_kwargs)
