"""Anonymize a folder of images with any anonymizer (``anonymize.py``; CAMOUFLaGE-Base, -Light, blur, yours:
see :mod:`camouflage_train.pipelines.anonymizer`).

Flow: check the config, the input paths and the output folder -> load the model -> annotate the folder into
person records (resumable; or use a given sidecar) -> the training data path (robust decoding, resize +
centre crop, person arrays, captions) -> the chosen pipeline -> images written under ``<output>/images/``
with the input's relative file names, and a ``manifest.jsonl`` with one row per input (its status, output
file, seed, the persons found and anonymized, the settings fingerprint; or skipped with the reason).

Processes: annotation and anonymization are ``trainer.predict`` jobs (``trainer`` group, as in training: one
device by default, ``trainer=ddp trainer.devices=<n>`` for one process per device, ``trainer.num_nodes``,
SLURM). Rank 0 claims the output folder (below) before any other process starts writing, and lists the inputs
not yet done; each process anonymizes its share and appends its rows to a manifest part of its own
(``manifest.rank-00001.jsonl``, flushed per row); at the end rank 0 appends the parts to ``manifest.jsonl``,
removes them and writes ``summary.json``. A killed run's parts are folded in by the next run, their rows done.
An image's seed comes from its file name, so it is the same image whatever the number of processes.

Fail safe: an image is ``done`` only when every person found in it was anonymized. An image where no person
was found (``on_no_person``) and one where some found persons were not anonymized (``on_persons_left``: beyond
``attributes.max_persons``, or partly cut off by the crop) is by default not written at all; ``blur`` writes it
reduced to a few average colours, ``copy`` / ``keep`` write it as the model saw it / as the model made it. Either
way it is flagged in the manifest, listed by name in ``summary.json`` (for the whole output folder, earlier runs
included) and named in a warning at the end. A face detector finds only the faces it
can: a person it misses is not anonymized, so check the detector on your images (``annotate.py``'s summary).

An output folder belongs to one set of settings (``run.json``: model config, checkpoint hash, resolution,
seed, captions, attributes, where the person records come from): a rerun with the same settings skips
what is done; a rerun with other settings is refused, naming what differs, unless ``overwrite=true``
(which replaces the earlier results).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from camouflage_train.annotation.run import ImageListing, annotate_dataset, check_job_strategy, job_trainer, on_device
from camouflage_train.data.dataset import CaptionBuilder, PersonImageDataset, Skipped, collate_skipping
from camouflage_train.data.images import pixels_to_image
from camouflage_train.data.sampling import image_seed
from camouflage_train.data.schema import AttributeSchema
from camouflage_train.data.sources import FolderSource
from camouflage_train.errors import UserError
from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.pipelines.light import check_checkpoint_base
from camouflage_train.pipelines.stand_ins import find_stand_ins, warn_stand_ins
from camouflage_train.utils.atomic import atomic_file, cut_torn_tail
from camouflage_train.utils.batch_job import BatchJob, JsonLinesPartsWriter, Written, run_batch_job
from camouflage_train.utils.config_checks import ConfigError, validate_config
from camouflage_train.utils.jsonl_parts import complete_rows, merge_parts, part_files, rows_with_parts
from camouflage_train.utils.paths import UnsafePathError, check_input_paths, file_sha256, inside

log = logging.getLogger(__name__)


# Keys of earlier versions, and what replaced them.
RETIRED_KEYS = {
    "device": "replaced by the trainer group: trainer.accelerator=gpu (or cpu) picks the device, trainer.devices=<n> "
    "how many (one process each), e.g. trainer=gpu, or trainer=ddp trainer.devices=8",
}


def check_retired_keys(cfg: DictConfig) -> None:
    """Name a key of an earlier version with what replaced it (before the generic unknown-key message).

    Args:
        cfg: the composed anonymize config.
    """
    found = [f"{key}: {why}" for key, why in RETIRED_KEYS.items() if key in cfg]
    if found:
        raise ConfigError("invalid config:\n  " + "\n  ".join(found))


class OutputConflictError(UserError, ValueError):
    """The output folder holds results made with other settings."""


# What is written for an image the anonymizer could not fully anonymize (checked with the config's other types).
OnNoPerson = Literal["skip", "blur", "copy"]
OnPersonsLeft = Literal["skip", "blur", "keep"]
# A blurred image keeps this many averaged pixels on its shorter side: no face detail, only coarse colours.
BLUR_PIXELS = 4


@dataclass
class AnonymizeInput:
    """``input`` of ``configs/anonymize/anonymize.yaml``.

    Args:
        folder: the images to anonymize.
        min_image_size: images with a shorter side are skipped (and listed in the manifest).
        max_skipped_fraction: stop when more than this share of the inputs is unusable.
    """

    folder: str
    min_image_size: int = 32
    max_skipped_fraction: float = 1.0  # every input gets a manifest row, so skipping is never silent


@dataclass
class CaptionSettings:
    """How an image's prompt is built from its person records.

    Args:
        template: the prompt; ``{people}`` is the persons' descriptions joined.
        person: one person's description, formatted with its attributes.
    """

    template: str = "a photo of {people}"
    person: str = "a {age:.0f} year old {gender}"


@dataclass
class AnonymizeConfig:
    """The top-level keys of ``configs/anonymize/anonymize.yaml`` (``anonymize.py``).

    Args:
        input: the input folder and its checks.
        output: the output folder (``images/``, ``manifest.jsonl``, ``run.json``).
        model: the anonymizer (``configs/anonymize/model/``).
        persons: a person-record sidecar; ``None`` annotates the images here.
        resolution: images are resized to this for the model, and back.
        batch_size: images per model call.
        num_workers: loader worker processes.
        seed: image seeds derive from it and the file name.
        cpu_offload: diffusers' model CPU offload onto each process's GPU (less GPU memory, slower).
        captions: how prompts are built from the persons.
        overwrite: replace results of other settings in ``output``.
        on_no_person: an image where no person is found: ``skip`` (not written), ``blur`` (written reduced to a
            few average colours) or ``copy`` (written as the model saw it: resized and centre-cropped).
        on_persons_left: an image where some persons found were not anonymized: ``skip``, ``blur`` or ``keep``
            (the anonymized image, those persons as they are).
        task_name: the run folder's name under ``logs/``.
        attributes: the attribute schema group.
        faces: the face pack group (annotation when ``persons`` is not given).
        bodies: the body detector group (annotation when ``persons`` is not given; ``None``: faces only, each
            person's extent then the face box grown by the schema's ``body.from_face``).
        trainer: the trainer group: device, processes, nodes (``trainer=ddp trainer.devices=<n>``).
        paths: the paths group.
    """

    input: AnonymizeInput
    output: str
    model: Any
    persons: str | None = None
    resolution: int = 512
    batch_size: int = 4
    num_workers: int = 2
    seed: int = 0
    cpu_offload: bool = False
    captions: CaptionSettings = field(default_factory=CaptionSettings)
    overwrite: bool = False
    on_no_person: OnNoPerson = "skip"
    on_persons_left: OnPersonsLeft = "skip"
    task_name: str = "anonymize"
    attributes: Any = None
    bodies: Any = None
    faces: Any = None
    trainer: Any = None
    paths: Any = None


# Pillow format per file extension, for the formats written without losing the anonymized content.
_WRITE_AS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
# Where files are and which hardware runs them: no effect on the images.
_NOT_SETTINGS = {"cache_dir", "providers", "ctx_id"}


def output_name(name: str) -> str:
    """The output file (under ``images/``) for input ``name``: the same name when its format is written as is,
    else ``<name>.png`` (e.g. a ``.gif``: 256 colours, so the output would not be what the model made).

    Args:
        name: the input's name relative to the input folder.
    """
    return name if Path(name).suffix.lower() in _WRITE_AS else f"{name}.png"


def _save(image: Any, path: Path) -> None:
    """Write in the format the file name says, atomically: a killed run never leaves a half-written image."""
    fmt = _WRITE_AS[path.suffix.lower()]
    with atomic_file(path) as staging:
        image.save(staging, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))


def blur_to_average_colours(image: Any) -> Any:
    """The whole image averaged down to :data:`BLUR_PIXELS` pixels on its shorter side and scaled back up: even a
    face that fills the picture is a few averaged colours, no features. The coarse colours of skin, hair, clothes and
    scene remain, and no re-identification was measured on such images: a placeholder, not an anonymization.

    Args:
        image: a PIL image.
    """
    from PIL import Image

    width, height = image.size
    scale = BLUR_PIXELS / min(width, height)
    small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX)
    return small.resize(image.size, Image.Resampling.BILINEAR)


def _fallback(policy: str, original: Any, anonymized: Any) -> tuple[str, Any]:
    """What an image that is not fully anonymized becomes under ``policy``: its status and the image to write
    (``None``: nothing is written)."""
    if policy == "blur":
        return "blurred", blur_to_average_colours(original)
    if policy == "copy":
        return "copied", original
    if policy == "keep":
        return "partly anonymized", anonymized
    if policy == "skip":
        return "skipped", None
    raise ValueError(f"unknown policy {policy!r}")  # validate_config refuses it first; fail closed all the same


def _without(node: Any, drop: set[str]) -> Any:
    if isinstance(node, dict):
        return {k: _without(v, drop) for k, v in node.items() if k not in drop}
    if isinstance(node, list):
        return [_without(v, drop) for v in node]
    return node


def output_settings(cfg: DictConfig) -> dict[str, Any]:
    """Everything that decides the written images (not batch size, workers, device, processes: see the README
    for what they may change). The checkpoint enters by content hash, so a retrained file under the same name counts.

    Args:
        cfg: the composed anonymize config.
    """
    plain = lambda node: _without(OmegaConf.to_container(node, resolve=True), _NOT_SETTINGS)  # noqa: E731
    model = plain(cfg.model)
    if model.get("checkpoint"):
        model["checkpoint"] = {
            "path": str(Path(model["checkpoint"]).resolve()),
            "sha256": file_sha256(model["checkpoint"]),
        }
    persons = (
        {"sidecar": str(Path(cfg.persons).resolve())}
        if cfg.get("persons")
        else {"annotated": plain(cfg.faces), "bodies": plain(cfg.bodies) if cfg.get("bodies") is not None else None}
    )
    return {
        "model": model,
        "on_no_person": cfg.on_no_person,
        "on_persons_left": cfg.on_persons_left,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
        "captions": plain(cfg.captions),
        "attributes": plain(cfg.attributes),
        "persons": persons,
    }


def _fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def settings_difference(before: Mapping[str, Any], now: Mapping[str, Any], limit: int = 24) -> list[str]:
    """``key: old -> new`` for every setting that differs (the first ``limit``, then a count).

    Args:
        before: the settings an earlier run recorded.
        now: this run's settings.
        limit: the most differences listed.
    """
    old, new = _flat(dict(before)), _flat(dict(now))
    missing = object()

    def show(value: Any) -> str:
        if value is missing:
            return "(not set)"
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    changed = [
        f"{key}: {show(old.get(key, missing))} -> {show(new.get(key, missing))}"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]
    return changed[:limit] + ([f"... and {len(changed) - limit} more"] if len(changed) > limit else [])


def _earlier_results(output: Path, annotated_here: bool) -> tuple[list[dict[str, Any]], bool]:
    """The manifest rows in ``output`` (a killed run's parts included; a row cut before its newline is not one:
    that image is redone) and whether person records this run would resume from are there."""
    rows = rows_with_parts(output / "manifest.jsonl")
    sidecar = output / "persons.jsonl"
    return rows, annotated_here and (sidecar.is_file() or bool(part_files(sidecar)))


def check_output(
    output: Path, settings: Mapping[str, Any], overwrite: bool, annotated_here: bool
) -> tuple[list[dict[str, Any]], bool]:
    """Refuse an ``output`` that holds results of other settings unless ``overwrite``; change nothing. Return the
    earlier manifest rows and whether they (or the person records there) are to be replaced.

    Args:
        output: the output folder.
        settings: this run's :func:`output_settings`.
        overwrite: replace an earlier run of other settings.
        annotated_here: the persons are annotated by this run (recorded in ``run.json``).
    """
    rows, annotated = _earlier_results(output, annotated_here)
    fingerprint = _fingerprint(settings)
    previous = _read_record(output / "run.json")
    # Every row of another run's settings is stale, written or not: an input skipped under other settings (no person
    # found by another face pack, another policy) must be tried again, not counted as done.
    # The person records this run would resume from were written under the earlier settings too (another face pack,
    # another max_persons): an earlier run killed before its first manifest row leaves only them.
    stale = bool(rows or annotated) and (
        previous.get("fingerprint") != fingerprint
        or any(row.get("output") and row.get("fingerprint") != fingerprint for row in rows)
    )
    if stale and not overwrite:
        written = sum(bool(row.get("output")) for row in rows)
        changes = settings_difference(previous.get("settings", {}), settings) or ["(earlier settings not recorded)"]
        raise OutputConflictError(
            f"output: {output} already holds the results of other settings ({written} image(s) written, "
            f"{len(rows) - written} input(s) not):\n  "
            + "\n  ".join(changes)
            + "\npass overwrite=true to replace them, or choose another output"
        )
    return rows, bool(rows or annotated) and (stale or overwrite)


def claim_output(
    output: Path, settings: Mapping[str, Any], overwrite: bool, annotated_here: bool
) -> tuple[list[dict[str, Any]], str]:
    """Make ``output`` this run's: refuse results of other settings unless ``overwrite`` (then remove what an
    earlier run wrote there); fold a killed run's manifest parts in; write ``run.json``; return the manifest rows
    to keep and the settings' fingerprint. One process does this, before any other writes.

    Args:
        output: the output folder.
        settings: this run's :func:`output_settings`.
        overwrite: replace an earlier run of other settings.
        annotated_here: the persons are annotated by this run (recorded in ``run.json``).
    """
    manifest, record = output / "manifest.jsonl", output / "run.json"
    rows, replace = check_output(output, settings, overwrite, annotated_here)
    if replace:
        for row in rows:
            if row.get("output"):
                (output / row["output"]).unlink(missing_ok=True)
        sidecars = [output / "persons.jsonl", output / "persons.summary.json"] if annotated_here else []
        for path in [manifest, *part_files(manifest), output / "summary.json", *sidecars]:
            path.unlink(missing_ok=True)
        for path in part_files(output / "persons.jsonl") if annotated_here else []:
            path.unlink(missing_ok=True)
        log.warning("overwrite=true: removed %d earlier result(s) from %s", len(rows), output)
    output.mkdir(parents=True, exist_ok=True)
    merge_parts(manifest)  # a killed run's rows: done, kept
    cut_torn_tail(manifest)  # only now that the folder is this run's: the next row starts a line of its own
    with atomic_file(record) as staging:
        Path(staging).write_text(json.dumps({"fingerprint": _fingerprint(settings), "settings": settings}, indent=2))
    return complete_rows(manifest), _fingerprint(settings)


def _read_record(record: Path) -> dict[str, Any]:
    """An earlier run's ``run.json``; ``{}`` when absent or unreadable (then any earlier rows count as stale)."""
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) else {}


class _Inputs(Dataset):
    """Every input of the run, each named: first the sidecar rows left out up front (each item a :class:`Skipped`
    with its reason: a manifest row), then the images.

    Args:
        dropped: the source's ``(name, reason)`` rows left out.
        dataset: the images' dataset.
        source: its source (for the names).
    """

    def __init__(self, dropped: list[tuple[str, str]], dataset: PersonImageDataset, source: FolderSource) -> None:
        self.dropped, self.dataset = dropped, dataset
        self.names = [name for name, _ in dropped] + [source.name_of(i) for i in range(len(source))]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Any:
        if index < len(self.dropped):
            name, reason = self.dropped[index]
            return Skipped(reason, name)
        return self.dataset[index - len(self.dropped)]


def anonymize_rows(
    batch: dict[str, Any],
    model: Any,
    seed: int,
    on_no_person: str,
    on_persons_left: str,
    output: Path,
    inputs: set[str],
    fingerprint: str,
) -> list[Written]:
    """A batch's manifest rows, each with its image to write (the anonymized one, or what a fail-safe policy makes
    of it), or skipped with the reason.

    Args:
        batch: a :func:`~camouflage_train.data.dataset.collate_skipping` batch.
        model: the anonymizer.
        seed: the run's seed (each image's is derived from it and the file name).
        on_no_person: the policy for an image where no person was found.
        on_persons_left: the policy for an image where some persons found were not anonymized.
        output: the output folder.
        inputs: every input's name (an output name must not be another input's).
        fingerprint: the settings' fingerprint, recorded in each written image's row.
    """

    def skip(name: str, reason: str, **details: Any) -> Written:
        return Written({"file": name, "status": "skipped", "reason": reason, **details})

    rows = [skip(name, reason) for name, reason in batch["skipped_items"]]
    if batch["size"] == 0:
        return rows
    images = [pixels_to_image(pixels) for pixels in batch["pixel_values"]]
    seeds = [image_seed(seed, name) for name in batch["name"]]
    persons = PersonBatch.from_batch(batch)
    outputs = model(images, persons, seeds, list(batch["caption"]))
    counts = persons.mask.sum(1).tolist()
    for name, seed_of_image, original, image, count, left in zip(
        batch["name"], seeds, images, outputs, counts, batch["persons_left"].tolist(), strict=True
    ):
        found = {"persons_found": int(count + left), "persons_anonymized": int(count)}
        status, policy = "done", None
        if count + left == 0 or left:  # not every person found was anonymized: the policy decides
            policy = on_no_person if count + left == 0 else on_persons_left
            status, image = _fallback(policy, original, image)
        if image is None:
            rows.append(skip(name, "no person found" if count + left == 0 else "persons left", **found))
            continue
        written = output_name(name)
        if written != name and written in inputs:
            rows.append(skip(name, f"output name {written} is also an input", **found))
            continue
        try:
            target = inside(output / "images", written)
        except UnsafePathError as error:
            log.warning("%s: not written", error)
            rows.append(skip(name, "unsafe output name", **found))
            continue
        row = {"file": name, "status": status, "output": f"images/{written}", "seed": seed_of_image, **found}
        rows.append(
            Written({**row, **({"policy": policy} if policy else {}), "fingerprint": fingerprint}, image, target)
        )
    return rows


def place(model: Any, device: torch.device, cpu_offload: bool) -> None:
    """Put the anonymizer on this process's device: with ``cpu_offload`` on a GPU, diffusers' model CPU offload onto
    it (when the anonymizer has a diffusers ``pipe``), else the whole model.

    Args:
        model: the anonymizer.
        device: the process's device.
        cpu_offload: offload to the CPU between uses.
    """
    if cpu_offload and device.type == "cuda" and hasattr(model, "pipe"):
        model.pipe.enable_model_cpu_offload(device=device)
    else:
        model.to(device)


def run_anonymization(cfg: DictConfig) -> dict[str, Any]:
    """Anonymize ``cfg.input.folder`` into ``cfg.output`` with ``cfg.model``, on every process of the ``trainer``
    group; return the run's summary (the same on every process).

    Args:
        cfg: the composed ``configs/anonymize/anonymize.yaml``.
    """
    check_retired_keys(cfg)
    validate_config(cfg, AnonymizeConfig)
    check_job_strategy(cfg.trainer)
    checkpoint = OmegaConf.select(cfg, "model.checkpoint", default=None)
    check_input_paths(
        {
            "input.folder": (cfg.input.folder, "folder"),
            "persons": (cfg.get("persons"), "file"),
            "model.checkpoint": (checkpoint, "file"),
        }
    )
    if checkpoint and str(cfg.model.get("_target_", "")).endswith("build_light"):  # before anything is written
        check_checkpoint_base(
            checkpoint, cfg.model.get("base_model"), key="model.checkpoint", attributes=cfg.attributes
        )
    output = Path(cfg.output)
    annotators = {} if cfg.get("persons") else {"faces": cfg.faces, "bodies": cfg.get("bodies")}
    stand_ins = find_stand_ins({"model": cfg.model, **{k: v for k, v in annotators.items() if v is not None}})
    settings = output_settings(cfg)
    schema = AttributeSchema.from_config(cfg.attributes)
    listing = None if cfg.get("persons") else ImageListing(cfg.input.folder, min_image_size=cfg.input.min_image_size)
    trainer = job_trainer(cfg.trainer)
    if trainer.is_global_zero:
        warn_stand_ins(stand_ins)
        kept_rows, fingerprint = claim_output(output, settings, bool(cfg.overwrite), listing is not None)
    else:  # the same refusal on every process; rank 0 claims the folder before the others start
        check_output(output, settings, bool(cfg.overwrite), listing is not None)
        kept_rows, fingerprint = [], _fingerprint(settings)
    device = trainer.strategy.root_device
    model = instantiate(cfg.model)  # before annotating: a model that does not load fails in seconds, not hours
    sidecar = Path(cfg.persons) if cfg.get("persons") else output / "persons.jsonl"
    if listing is not None:
        bodies = instantiate(cfg.bodies, **on_device(cfg.bodies, device)) if cfg.get("bodies") is not None else None
        annotate_dataset(
            listing,
            instantiate(cfg.faces, **on_device(cfg.faces, device)),
            sidecar,
            schema.max_persons,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            bodies=bodies,
            trainer=trainer,
        )
    source = FolderSource(
        cfg.input.folder,
        sidecar,
        schema=schema.to_config(),
        min_image_size=cfg.input.min_image_size,
        max_skipped_fraction=cfg.input.max_skipped_fraction,
    )
    dataset = PersonImageDataset(source, schema, cfg.resolution, captions=CaptionBuilder(**cfg.captions))
    place(model, device, bool(cfg.get("cpu_offload")))
    inputs = _Inputs(source.dropped, dataset, source)
    done = {row["file"] for row in kept_rows}
    pending = [i for i, name in enumerate(inputs.names) if name not in done] if trainer.is_global_zero else None
    position = {name: i for i, name in enumerate(inputs.names)}
    writer = JsonLinesPartsWriter(  # the manifest keeps the inputs' order
        output / "manifest.jsonl", order=lambda row: position.get(row.get("file"), len(position)), save=_save
    )
    step = partial(
        anonymize_rows,
        model=model,
        seed=cfg.seed,
        on_no_person=cfg.on_no_person,
        on_persons_left=cfg.on_persons_left,
        output=output,
        inputs=set(inputs.names),
        fingerprint=fingerprint,
    )
    job = BatchJob(inputs, pending, step, writer, cfg.batch_size, cfg.num_workers, collate_fn=collate_skipping)
    added = run_batch_job(trainer, job)
    summary: dict[str, Any] | None = None
    if trainer.is_global_zero:
        seconds = job.finished - job.started
        summary = _summary(added, len(done), seconds, stand_ins, output, cfg.on_no_person, cfg.on_persons_left)
    return trainer.strategy.broadcast(summary, src=0)


def _summary(
    added: list[dict[str, Any]],
    already_done: int,
    seconds: float,
    stand_ins: dict[str, str],
    output: Path,
    on_no_person: str,
    on_persons_left: str,
) -> dict[str, Any]:
    """The run's summary from the rows it added (every process's), written to ``summary.json`` and logged, with the
    images of the whole output folder that are not fully anonymized named in a warning."""
    summary: dict[str, Any] = {
        "done": 0,
        "blurred": 0,
        "copied": 0,
        "partly_anonymized": 0,
        "skipped": Counter(),
        "already_done": already_done,
        "seconds": round(seconds, 3),  # the anonymization's own time: every process ready to every process done
        "images_per_s": round(len(added) / seconds, 3) if seconds else 0.0,  # inputs given a row, per second
        "stand_ins": stand_ins,
    }
    for row in added:
        if row["status"] == "skipped":
            summary["skipped"][row["reason"]] += 1
        else:
            summary[row["status"].replace(" ", "_")] += 1
    summary["skipped"] = dict(summary["skipped"])
    summary.update(_flagged(complete_rows(output / "manifest.jsonl"), on_no_person, on_persons_left))
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    listed = ("no_person", "persons_left", "stand_ins")  # named in the warnings
    log.info("anonymization summary: %s", {k: v for k, v in summary.items() if k not in listed})
    _warn_not_anonymized(summary, output)
    return summary


def _flagged(rows: list[dict[str, Any]], on_no_person: str, on_persons_left: str) -> dict[str, Any]:
    """The images of the whole output folder (earlier runs' rows included) in which no person was found or some
    were not anonymized, by name, and the persons anonymized in the written images.

    Args:
        rows: every manifest row.
        on_no_person: the policy, for the summary.
        on_persons_left: the policy, for the summary.
    """
    counted = [row for row in rows if "persons_found" in row]
    return {
        "persons_anonymized": sum(
            row["persons_anonymized"] for row in counted if row.get("output") and row["status"] != "blurred"
        ),
        "no_person": {"policy": on_no_person, "images": [row["file"] for row in counted if row["persons_found"] == 0]},
        "persons_left": {
            "policy": on_persons_left,
            "images": {
                row["file"]: row["persons_found"] - row["persons_anonymized"]
                for row in counted
                if row["persons_found"] > row["persons_anonymized"]
            },
        },
    }


def _warn_not_anonymized(summary: Mapping[str, Any], output: Path, shown: int = 10) -> None:
    """Name the images that are not (fully) anonymized, with what was done with them."""
    action = {"skip": "not written", "blur": "written reduced to a few average colours", "copy": "written unchanged",
              "keep": "written with those persons unchanged"}  # fmt: skip
    for key, what in (("no_person", "no person found"), ("persons_left", "persons found but not anonymized")):
        images, policy = summary[key]["images"], summary[key]["policy"]
        if images:
            names = [f"{n} ({images[n]})" if isinstance(images, dict) else n for n in list(images)[:shown]]
            more = f" and {len(images) - shown} more" if len(images) > shown else ""
            log.warning(
                "%d image(s) with %s, %s (%s=%s): %s%s; all of them are in %s",
                len(images), what, action[policy], "on_" + key, policy, ", ".join(names), more,
                output / "summary.json",
            )  # fmt: skip
