"""Training order and per-sample randomness that depend only on (seed, epoch, index).

That property is what makes a run resumed mid-epoch after a crash, and a run on N processes, see the
same samples with the same augmentations, noise and timesteps as one uninterrupted single-process run:

* :class:`ResumableSampler` shuffles with ``seed + epoch`` only, shards over ranks like
  ``DistributedSampler`` (rank ``r`` takes positions ``r, r + N, ...``, so N ranks with batch ``B / N``
  cover exactly the samples of one rank with batch ``B``), and can start an epoch at a given position;
* it yields keys ``(index, sample_seed)``; datasets draw their augmentations from ``sample_seed`` and the
  training step draws the sample's noise, timestep and dropout from it.

Each random decision about a sample (:class:`Draw`: crop, flip, caption drop, ...) has its own stream, a generator
seeded by hashing the sample seed together with the decision's name (:func:`draw_generator`). The names are
distinct (``Draw`` is a unique enum), so two decisions never share a seed; their streams are as independent as
hashed seeds make them (a CPU generator keeps 32 bits of its seed: two streams meet with chance 2**-32).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)

SampleKey = tuple[int, int]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for everything random about sample ``index`` in ``epoch``.

    Args:
        seed: the run's data seed.
        epoch: the epoch.
        index: the sample's index in the dataset.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def image_seed(seed: int, name: str) -> int:
    """The generation seed of an image (anonymization, evaluation) from its file name: independent of batch
    size, order and reruns.

    Args:
        seed: the run's seed.
        name: the image's stable name (its path relative to the input folder).
    """
    return (seed + zlib.crc32(name.encode("utf-8"))) % 2**31


@enum.unique
class Draw(enum.Enum):
    """The random decisions about one training sample; each reads its own stream (:func:`draw_generator`).

    The data pipeline draws ``CROP`` and ``FLIP``; the training step draws the rest.
    """

    CROP = "crop"
    FLIP = "flip"
    CAPTION_DROP = "caption-drop"
    PERSON_DROP = "person-drop"
    TIMESTEP = "timestep"
    POSTERIOR = "vae-posterior"
    NOISE = "diffusion-noise"
    NOISE_OFFSET = "noise-offset"


def draw_seed(seed: int, draw: Draw) -> int:
    """The 63-bit seed of decision ``draw`` about the sample whose seed is ``seed``.

    Args:
        seed: the sample's seed (:func:`sample_seed`).
        draw: which decision.
    """
    if not isinstance(draw, Draw):
        raise TypeError(f"draw must be a Draw member, got {draw!r}")
    digest = hashlib.blake2b(f"{int(seed)}/{draw.value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw_generator(seed: int, draw: Draw, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` for decision ``draw`` about the sample whose seed is ``seed``.

    Args:
        seed: the sample's seed (:func:`sample_seed`).
        draw: which decision.
        device: where the numbers are drawn.
    """
    return torch.Generator(device=device).manual_seed(draw_seed(seed, draw))


def split_key(key: int | SampleKey) -> tuple[int, int | None]:
    """``(index, sample seed)`` for a sampler key; a plain index (evaluation, caching) gets ``None`` (no
    randomness source of its own: the caller's global RNG is used).

    Args:
        key: an index, or ``(index, sample seed)`` from :class:`ResumableSampler`.
    """
    if isinstance(key, tuple):
        index, seed = key
        return int(index), int(seed)
    return int(key), None


def generator_for(seed: int | None, draw: Draw) -> torch.Generator | None:
    """:func:`draw_generator` on the host, or ``None`` (the global RNG) for a sample without a seed.

    Args:
        seed: the sample's seed, or ``None``.
        draw: which decision.
    """
    return None if seed is None else draw_generator(seed, draw)


class KeyedSubset(Dataset):
    """A subset that also accepts ``(position, seed)`` keys, passing the seed through to the dataset.

    Args:
        dataset: the full dataset.
        indices: the subset's positions in it.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | SampleKey) -> Any:
        if isinstance(key, tuple):
            return self.dataset[(self.indices[key[0]], key[1])]
        return self.dataset[self.indices[key]]


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` (so Lightning's DDP keeps it as is) that yields ``(index, sample_seed)`` keys and
    can start the current epoch at a position (resuming from a mid-epoch checkpoint).

    Args:
        size: the dataset's length.
        seed: the order and every sample seed derive from it.
        num_replicas: processes sharing the data.
        rank: this process.
        shuffle: a new seeded order every epoch.
        drop_last: drop the tail that does not split evenly over the processes.
    """

    def __init__(
        self, size: int, seed: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, drop_last: bool = False
    ) -> None:
        super().__init__(
            range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start = 0

    def start_at(self, position: int) -> None:
        """Skip the first ``position`` samples of this rank's order in the next iteration (once).

        Args:
            position: samples of this rank's order to skip.
        """
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"resume position {position} is outside this epoch's {self.num_samples} samples")
        self.start = position

    def __iter__(self) -> Iterator[SampleKey]:
        positions = list(super().__iter__())
        start, self.start = self.start, 0
        for index in positions[start:]:
            yield index, sample_seed(self.seed, self.epoch, index)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position is part of the checkpoint.

    Lightning saves a loader's ``state_dict`` with every checkpoint and hands it back through
    ``load_state_dict`` before the restored epoch starts. The state is the seed, the epoch and how many batches
    this epoch has yielded (Lightning does not prefetch from a loader whose length it knows, so at a checkpoint
    that is exactly the batches trained); the resumed epoch then starts after them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._restored: dict[str, Any] | None = None

    @property
    def resumable(self) -> bool:
        """False when Lightning has rebuilt this loader with a sampler of its own (``overfit_batches`` uses a
        ``SequentialSampler``): then there is no position to save or restore."""
        return isinstance(self.sampler, ResumableSampler)

    def __iter__(self) -> Iterator[Any]:
        restored, self._restored = self._restored, None
        self._yielded = 0
        if self.resumable and restored is not None and restored.get("epoch") == self.sampler.epoch:
            position = int(restored.get("batches", 0)) * self.batch_size
            if 0 < position <= self.sampler.num_samples:
                log.info("resuming epoch %d after %d batches", self.sampler.epoch, restored["batches"])
                self.sampler.start_at(position)
                self._yielded = int(restored["batches"])
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The seed, the epoch and the batches yielded so far in it (empty for a loader that is not resumable)."""
        if not self.resumable:
            return {}
        return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the restored epoch after the batches the checkpoint had trained.

        Args:
            state: what :meth:`state_dict` saved.
        """
        if not self.resumable or not state:
            return
        if state.get("seed") != self.sampler.seed:
            log.warning(
                "data.seed is %s but the checkpoint was trained with %s: the resumed run's order and noise differ",
                self.sampler.seed,
                state.get("seed"),
            )
        if "batches" not in state:
            log.warning("the checkpoint records no loader position (an older format): its epoch starts over")
        self._restored = dict(state)
