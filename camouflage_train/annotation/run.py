"""Annotate a dataset into the person-record sidecar the DataModule reads, resumably.

The run is a ``trainer.predict`` job (``trainer`` group: one device by default, ``trainer=ddp
trainer.devices=<n>`` for one process per device, ``trainer.num_nodes`` and SLURM as in training): each process
annotates its share of the images not yet done and appends each finished row, flushed at once, to a part of its
own (``persons.rank-00001.jsonl``); at the end rank 0 appends the parts' rows to the sidecar in listing order and
removes them. A killed run loses at most the images in flight: a rerun folds the parts it finds into the sidecar,
drops torn last lines, and skips what is done, before the remaining images are shared out.
Rows: ``{"file" | "index", "width", "height", "persons", "faces_detected", "faces_dropped",
"schema_version"}`` (plus ``"bodies_without_face"`` when a body detector runs: its person boxes that no face was
given), or ``{"file" | "index", "persons": [], "skipped": <reason>}`` for an unusable image (readers leave those
out and count them). With a body detector (``bodies`` group, :mod:`.bodies`) a person record carries the matched
``body`` box; the records are still the faces.

Folder listing rule: symbolic links are followed, to files and to folders alike; a folder reached twice
(a link loop, two links to one folder) is listed once; broken links and files without an image extension
are not listed, and both are counted in the summary.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from camouflage_train.annotation.bodies import BodyDetector
from camouflage_train.data.images import BadSampleError, load_rgb
from camouflage_train.data.schema import BODY_KEY, RECORD_SCHEMA_VERSION, keep_largest
from camouflage_train.errors import DataError, InputError
from camouflage_train.utils.atomic import cut_torn_tail
from camouflage_train.utils.batch_job import BatchJob, JsonLinesPartsWriter, Written, run_batch_job
from camouflage_train.utils.config_checks import ConfigError, validate_config
from camouflage_train.utils.jsonl_parts import merge_parts

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def list_images(folder: Path) -> tuple[list[str], Counter[str]]:
    """Image file names under ``folder`` (relative, sorted) and what was not listed, by reason.

    Args:
        folder: the folder to walk (recursively).
    """
    names: list[str] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for current, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            skipped["folder reached twice through a link"] += 1
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        for name in filenames:
            path = Path(current, name)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped["not an image file name"] += 1
            elif not path.exists():
                skipped["broken symlink"] += 1
            else:
                names.append(path.relative_to(folder).as_posix())
    return sorted(names), skipped


class ImageListing(Dataset):
    """The images to annotate: a folder (recursive) or a ``datasets`` split; items are ``(key, image | reason)``.

    Args:
        folder: a folder of images (or ``None``).
        dataset: a ``datasets`` repository id or local folder (or ``None``).
        split: its split.
        image_column: its image column.
        revision: the dataset revision to read.
        min_image_size: images with a shorter side are skipped, with the reason.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        dataset: str | None = None,
        split: str = "train",
        image_column: str = "image",
        revision: str | None = None,
        min_image_size: int = 32,
    ) -> None:
        if (folder is None) == (dataset is None):
            raise DataError("give exactly one of input.folder or input.dataset")
        self.min_image_size = min_image_size
        self.folder = Path(folder) if folder is not None else None
        self.hf = None
        self.not_listed: Counter[str] = Counter()
        if self.folder is not None:
            if not self.folder.is_dir():
                raise InputError(f"input.folder: image folder not found: {self.folder}")
            self.key_field = "file"
            self.keys: list[Any]
            self.keys, self.not_listed = list_images(self.folder)
            if self.not_listed:
                log.warning("%s: not listed: %s", self.folder, dict(self.not_listed))
            if not self.keys:
                extra = f"; not listed: {dict(self.not_listed)}" if self.not_listed else ""
                raise DataError(
                    f"no images found in {self.folder} (extensions {', '.join(sorted(IMAGE_SUFFIXES))}){extra}"
                )
        else:
            import datasets

            path = Path(str(dataset))
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                self.hf = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            else:
                self.hf = datasets.load_dataset(str(dataset), split=split, revision=revision)
            if image_column not in self.hf.column_names:
                raise DataError(f"dataset {dataset}[{split}] has no column '{image_column}': {self.hf.column_names}")
            self.image_column, self.key_field = image_column, "index"
            self.keys = list(range(len(self.hf)))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[Any, Image.Image | str]:
        key = self.keys[i]
        try:
            if self.folder is not None:
                return key, load_rgb(self.folder / key, self.min_image_size)
            return key, load_rgb(self.hf[key][self.image_column], self.min_image_size)
        except BadSampleError as err:
            return key, err.reason


@dataclass
class AnnotationSummary:
    """What one annotation run did (logged at the end and returned).

    Args:
        images: images listed.
        already_done: images already in the output (a resumed run) and left alone.
        faces: faces written.
        images_without_face: images written with no person.
        faces_dropped_over_max_persons: faces beyond ``max_persons`` (the largest are kept).
        body_detector: the body detector's model (``None``: none ran, records are faces only).
        bodies: persons written with a ``body`` box.
        bodies_without_face: person boxes of the body detector that no face was given (not persons of the records).
        skipped: images not annotated, by reason.
        not_listed: files of the folder that are not images, by reason.
        seconds: the annotation's own time, from every process ready to every process done (loading and
            process start left out).
    """

    images: int = 0
    already_done: int = 0
    faces: int = 0
    images_without_face: int = 0
    faces_dropped_over_max_persons: int = 0
    body_detector: str | None = None
    bodies: int = 0
    bodies_without_face: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    not_listed: Counter[str] = field(default_factory=Counter)  # files of the folder that are not images
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values."""
        rate = self.images / self.seconds if self.seconds else 0.0
        return {
            **self.__dict__,
            "skipped": dict(self.skipped),
            "not_listed": dict(self.not_listed),
            "images_per_s": round(rate, 2),
        }


def _done_keys(path: Path, key_field: str) -> set[Any]:
    """Keys already in the sidecar; a torn last line (killed mid-write) is cut off."""
    done = set()
    for number, line in enumerate(cut_torn_tail(path).decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                done.add(json.loads(line)[key_field])
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(
                    f"{path}:{number}: not a sidecar row ({err}); move the file away to start over"
                ) from err
    return done


def annotate_rows(
    batch: list[tuple[Any, Image.Image | str]],
    key_field: str,
    annotator: Callable[[Image.Image], list[dict[str, Any]]],
    max_persons: int,
    bodies: BodyDetector | None = None,
) -> list[Written]:
    """The sidecar rows of a batch of ``(key, image | reason)`` items (:class:`ImageListing`'s).

    Args:
        batch: the items.
        key_field: ``file`` or ``index``.
        annotator: an image -> its person records.
        max_persons: the most persons kept per image (the largest faces).
        bodies: the body detector whose person boxes are matched to the faces (``None``: faces only).
    """
    rows = []
    for key, image in batch:
        row: dict[str, Any] = {key_field: key, "schema_version": RECORD_SCHEMA_VERSION}
        if isinstance(image, str):
            row.update(persons=[], skipped=image)
        else:
            persons = annotator(image)
            unmatched: list[list[float]] = []
            if bodies is not None:  # every face found competes for the bodies, before max_persons cuts
                persons, unmatched = bodies.match(persons, image)
            kept = keep_largest(persons, max_persons)
            row.update(
                width=image.width,
                height=image.height,
                persons=kept,
                faces_detected=len(persons),
                faces_dropped=len(persons) - len(kept),
            )
            if bodies is not None:
                row["bodies_without_face"] = len(unmatched)
        rows.append(Written(row))
    return rows


def _count(summary: AnnotationSummary, rows: list[dict[str, Any]]) -> None:
    """Add the sidecar rows a run wrote to its summary."""
    for row in rows:
        summary.images += 1
        if "skipped" in row:
            summary.skipped[row["skipped"]] += 1
            continue
        summary.faces += len(row["persons"])
        summary.faces_dropped_over_max_persons += row["faces_dropped"]
        summary.images_without_face += row["faces_detected"] == 0
        if summary.body_detector is not None:
            summary.bodies += sum(person.get(BODY_KEY) is not None for person in row["persons"])
            summary.bodies_without_face += row.get("bodies_without_face", 0)


def one_process_trainer(progress: bool = True) -> L.Trainer:
    """A trainer for a batch job in this process alone, on the CPU (the job's models keep their own devices).

    Args:
        progress: show a progress bar.
    """
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )


def annotate_dataset(
    listing: ImageListing,
    annotator: Callable[[Image.Image], list[dict[str, Any]]],
    output: str | Path,
    max_persons: int,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
    bodies: BodyDetector | None = None,
    trainer: L.Trainer | None = None,
) -> AnnotationSummary:
    """Annotate every image of ``listing`` not yet in ``output``; return (and log) the run's summary.

    Every process of ``trainer`` calls this with the same listing: rank 0 folds the parts a killed run left into
    ``output`` and lists the images still to do; each process annotates its share into a part of its own
    (:mod:`camouflage_train.utils.batch_job`); rank 0 then appends the parts' rows to ``output`` in listing order
    and writes ``<output stem>.summary.json``. Every process returns the same summary.

    Args:
        listing: the images.
        annotator: an image -> its person records.
        output: the JSON-lines sidecar to write (appended to: a killed run resumes).
        max_persons: the most persons kept per image (the largest faces).
        batch_size: images per loader batch, per process.
        num_workers: loader worker processes (decoding), per process.
        progress: show a progress bar (when no ``trainer`` is given).
        bodies: the body detector whose person boxes are matched to the faces (:meth:`.bodies.BodyDetector.match`);
            ``None``: faces only.
        trainer: the job's trainer (``None``: this process alone, :func:`one_process_trainer`).
    """
    output = Path(output)
    trainer = trainer if trainer is not None else one_process_trainer(progress)
    key_field = listing.key_field
    position = {key: i for i, key in enumerate(listing.keys)}
    pending = None
    if trainer.is_global_zero:
        output.parent.mkdir(parents=True, exist_ok=True)
        done = _done_keys(output, key_field)
        done |= {row.get(key_field) for row in merge_parts(output)}  # a killed run's parts count as done
        pending = [i for i, key in enumerate(listing.keys) if key not in done]
    if bodies is not None:
        bodies.load()  # before the first image: a detector that does not load fails now, not mid-run
    # the sidecar keeps the listing's order
    writer = JsonLinesPartsWriter(output, order=lambda row: position.get(row.get(key_field), len(position)))
    step = partial(annotate_rows, key_field=key_field, annotator=annotator, max_persons=max_persons, bodies=bodies)
    job = BatchJob(listing, pending, step, writer, batch_size, num_workers, collate_fn=list)
    added = run_batch_job(trainer, job)
    summary = None
    if trainer.is_global_zero:
        assert pending is not None
        summary = AnnotationSummary(already_done=len(listing) - len(pending), not_listed=Counter(listing.not_listed))
        summary.body_detector = bodies.model_id if bodies is not None else None
        _count(summary, added)
        summary.seconds = job.finished - job.started
        result = summary.as_dict()
        output.with_suffix(".summary.json").write_text(json.dumps(result, indent=2))
        log.info("annotation of %s: %s", output, result)
    return trainer.strategy.broadcast(summary, src=0)


@dataclass
class AnnotateInput:
    """``input`` of ``configs/annotate.yaml``.

    Args:
        folder: a folder of images.
        dataset: or a ``datasets`` repository id / local folder.
        split: the dataset split.
        image_column: the dataset's image column.
        revision: the dataset revision.
        min_image_size: images with a shorter side are skipped.
    """

    folder: str | None = None
    dataset: str | None = None
    split: str = "train"
    image_column: str = "image"
    revision: str | None = None
    min_image_size: int = 32


@dataclass
class AnnotateConfig:
    """The keys of ``configs/annotate.yaml`` (``annotate.py``).

    Args:
        input: what to annotate.
        output: the sidecar file to write.
        batch_size: images per batch.
        num_workers: loader worker processes.
        task_name: the run folder's name under ``logs/``.
        attributes: the attribute schema group.
        faces: the face pack group (detector, attributes).
        bodies: the body detector group (``None``: faces only).
        trainer: the trainer group: devices, processes, nodes (``trainer=ddp trainer.devices=<n>``).
        paths: the paths group.
    """

    input: AnnotateInput
    output: str
    batch_size: int = 16
    num_workers: int = 2
    task_name: str = "annotate"
    attributes: Any = None
    faces: Any = None
    bodies: Any = None
    trainer: Any = None
    paths: Any = None


def check_job_strategy(trainer: DictConfig) -> None:
    """Refuse a sharded strategy for a batch job: each process holds whole frozen models (``trainer=ddp``).

    Args:
        trainer: the ``trainer`` config.
    """
    strategy = trainer.get("strategy")
    name = str(strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy)
    if "fsdp" in name.lower() or "deepspeed" in name.lower():
        raise ConfigError(
            f"trainer.strategy: {name} shards training state, which annotation and anonymization do not have "
            "(every process holds the whole frozen models): use trainer=ddp trainer.devices=<n> for several devices"
        )


def job_trainer(trainer: DictConfig) -> L.Trainer:
    """The trainer of ``annotate.py`` / ``anonymize.py`` from the ``trainer`` group (its ranks are known at once).

    Args:
        trainer: the ``trainer`` config.
    """
    check_job_strategy(trainer)
    return instantiate(trainer)


def on_device(node: DictConfig | None, device: torch.device) -> dict[str, Any]:
    """The overrides that put a face pack (``ctx_id``) or a body detector (``device: auto``) on this process's
    device: ``ctx_id`` becomes the process's GPU (``-1`` on the CPU) unless it asks for the CPU; ``auto`` becomes
    the device. Other values, and configs without those keys, are left as they are.

    Args:
        node: the ``faces`` or ``bodies`` config.
        device: the process's device (``trainer.strategy.root_device``).
    """
    if node is None:
        return {}
    overrides: dict[str, Any] = {}
    if node.get("ctx_id") is not None and int(node.ctx_id) >= 0:
        overrides["ctx_id"] = (device.index or 0) if device.type == "cuda" else -1
    if "device" in node and node.get("device") in (None, "auto"):
        overrides["device"] = str(device)
    return overrides


def run_annotation(cfg: DictConfig) -> AnnotationSummary:
    """``annotate.py``: check the config and inputs, list the images, build the trainer (``trainer`` group), check
    the body detector's repository (its file list, before any model loads), build the face annotator on this
    process's device, load the body detector, annotate (every process its share). Every process returns the
    merged run's summary.

    Args:
        cfg: the composed ``configs/annotate.yaml``.
    """
    validate_config(cfg, AnnotateConfig)
    check_job_strategy(cfg.trainer)
    listing = ImageListing(**cfg.input)
    trainer = job_trainer(cfg.trainer)
    device = trainer.strategy.root_device
    bodies = None
    if cfg.get("bodies") is not None:  # its repository checked here
        bodies = instantiate(cfg.bodies, **on_device(cfg.bodies, device))
    annotator = instantiate(cfg.faces, **on_device(cfg.faces, device))
    return annotate_dataset(
        listing,
        annotator,
        cfg.output,
        cfg.attributes.max_persons,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        bodies=bodies,
        trainer=trainer,
    )
