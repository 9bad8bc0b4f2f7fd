"""Batch jobs over a list of inputs through ``trainer.predict`` (``annotate.py``, ``anonymize.py``): one process
per device, on one machine or several (``trainer=ddp``, ``trainer.num_nodes``, SLURM), as in training.

- :class:`BatchJob`: the LightningModule. Rank 0 lists the inputs still to do (those an earlier run finished are
  left out *before* sharding); ``setup`` hands that list to every process; each process takes its own share
  (:class:`ShardSampler`: interleaved, no input twice, no padding) and runs the job's ``step`` on its batches.
  The models are the job's: the module holds no parameters, so the strategy neither casts, moves nor
  synchronizes them, and batches stay on the host (the anonymizers take PIL images and place their own tensors).
- :class:`JsonLinesPartsWriter`: the prediction writer. Each output's file is written atomically, then its row
  is appended to the process's own part of the JSON-lines target (flushed per row, synced per batch); after
  every process is done, rank 0 folds the parts into the target (:mod:`camouflage_train.utils.jsonl_parts`).
- :func:`run_batch_job`: predict, wait for every process, merge.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from camouflage_train.utils.atomic import cut_torn_tail
from camouflage_train.utils.jsonl_parts import merge_parts, part_file


class Written(NamedTuple):
    """One output of a job's step: its row and, when it has one, the file written (atomically) before the row.

    Args:
        row: the JSON-ready row (a manifest or sidecar line).
        image: what is written to ``path`` (``None``: a row without a file).
        path: where.
    """

    row: dict[str, Any]
    image: Any = None
    path: Path | None = None


class ShardSampler(DistributedSampler):
    """Process ``rank`` of ``num_replicas`` takes items ``rank, rank + num_replicas, ...``: every item once, no
    padding, so shares differ by at most one item and may be empty (fewer items left than processes).

    Lightning's own choice for ``predict`` (``UnrepeatedDistributedSamplerWrapper``) splits the same way, but
    asserts that every process gets an item, which a resumed run with a few inputs left would fail. Being a
    ``DistributedSampler``, this one is kept as it is by the trainer.

    Args:
        dataset: the items (sized).
        num_replicas: the number of processes.
        rank: this process's global rank.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class JsonLinesPartsWriter(BasePredictionWriter):
    """Write each batch's :class:`Written` outputs: the files (with ``save``), then the rows, to this process's part
    of ``target`` (``<stem>.rank-<rank>.jsonl``), each row flushed at once and the part synced after every batch.
    A process that gets no batch writes no part.

    Args:
        target: the JSON-lines file the parts are merged into.
        order: the sort key of the merged rows (``None``: by rank, then in writing order).
        save: writes an output's ``image`` to its ``path`` (atomically).
    """

    def __init__(
        self,
        target: str | Path,
        order: Callable[[dict[str, Any]], Any] | None = None,
        save: Callable[[Any, Path], None] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.target, self.order, self.save = Path(target), order, save
        self._handle: IO[str] | None = None

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Sequence[Written],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._handle is None:
            part = part_file(self.target, trainer.global_rank)
            part.parent.mkdir(parents=True, exist_ok=True)
            cut_torn_tail(part)
            self._handle = part.open("a", encoding="utf-8")
        for item in prediction:
            if item.image is not None:
                if self.save is None or item.path is None:
                    raise ValueError(f"{self.target}: an output with an image needs a path and a save function")
                self.save(item.image, item.path)
            self._handle.write(json.dumps(item.row) + "\n")
            self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Close this process's part (kept on disk until :meth:`merge`)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.close()

    def merge(self) -> list[dict[str, Any]]:
        """Fold every process's part into the target (one process, once all are done); return the rows added."""
        self.close()
        return merge_parts(self.target, self.order)


class BatchJob(L.LightningModule):
    """``trainer.predict`` over the pending items of ``dataset``: this process's share of them, in batches, each
    made into :class:`Written` outputs by ``step`` and written by ``writer``.

    Args:
        dataset: every input of the job (indexable, sized).
        pending: the positions in ``dataset`` still to do, on rank 0 (the other processes receive them in
            ``setup``; pass ``None`` there).
        step: a batch -> its outputs.
        writer: the job's prediction writer (attached to the trainer for this job only).
        batch_size: items per batch, per process.
        num_workers: loader worker processes, per process.
        collate_fn: the loader's collate function.
    """

    def __init__(
        self,
        dataset: Dataset,
        pending: Sequence[int] | None,
        step: Callable[[Any], list[Written]],
        writer: JsonLinesPartsWriter,
        batch_size: int,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        super().__init__()
        # A process may be left without a batch (fewer pending inputs than processes): predict has no step to match.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.dataset, self.step, self.writer = dataset, step, writer
        self.pending = None if pending is None else list(pending)
        self.batch_size, self.num_workers, self.collate_fn = batch_size, num_workers, collate_fn
        self.started = self.finished = 0.0

    def setup(self, stage: str) -> None:
        # Rank 0's list, decided before any process writes: every process shards the same list.
        self.pending = self.trainer.strategy.broadcast(self.pending, src=0)
        if self.pending is None:
            raise RuntimeError("BatchJob: rank 0 has no list of pending inputs")
        self.started = time.perf_counter()  # every process is up: the job's own time starts

    def predict_dataloader(self) -> DataLoader:
        subset = Subset(self.dataset, self.pending)
        sampler = ShardSampler(subset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank)
        return DataLoader(
            subset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
        )

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # the job's models place their own inputs

    def predict_step(self, batch: Any, batch_idx: int) -> list[Written]:
        return self.step(batch)

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.writer]


def run_batch_job(trainer: L.Trainer, job: BatchJob) -> list[dict[str, Any]]:
    """Run ``job`` on every process, wait until all are done, merge their parts on rank 0, wait for the merge;
    return the rows this run added to the target on rank 0 (``[]`` on the other ranks). Every process calls it.
    ``job.finished - job.started``: the job's own seconds (every process up to every process done).

    Args:
        trainer: the job's trainer (already built: its ranks are known).
        job: the job.
    """
    with warnings.catch_warnings():
        # Nothing left to do (a finished run again), or less than one item per process: expected, not a mistake.
        warnings.filterwarnings("ignore", message=r"Total length of .* across ranks is zero")
        trainer.predict(job, return_predictions=False)
    if job.writer in trainer.callbacks:  # this job's writer only: a later job on this trainer brings its own
        trainer.callbacks.remove(job.writer)
    job.writer.close()
    trainer.strategy.barrier("batch job written")
    job.finished = time.perf_counter()
    added = job.writer.merge() if trainer.is_global_zero else []
    trainer.strategy.barrier("batch job merged")  # the target is complete before any process reads it
    return added
