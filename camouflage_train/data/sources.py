"""Where images and their person records come from.

Each source is an indexable of :class:`RawSample` (a PIL image, its person records, an optional caption),
so the dataset, the transforms and the caption logic are written once for all of them:

* :class:`SyntheticSource`: procedurally drawn scenes (demo, tests);
* :class:`FolderSource`: an image folder plus a JSONL or Parquet sidecar of person records;
* :class:`HFDatasetSource`: a Hugging Face ``datasets`` dataset (hub id, local script/data dir, or a
  ``save_to_disk`` folder), persons from a column or from a sidecar keyed by row index.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from camouflage_train.compat.data_internals import dataset_fingerprint
from camouflage_train.data.images import BadSampleError, load_rgb
from camouflage_train.data.schema import RECORD_SCHEMA_VERSION, AttributeSchema, InvalidRecordError, as_schema
from camouflage_train.data.synthetic import FACE_SIZE, WORLD_VERSION, check_face_size, draw_scene
from camouflage_train.errors import DataError, InputError
from camouflage_train.utils.hub import download_hint, first_line, transport_errors
from camouflage_train.utils.paths import file_sha256

log = logging.getLogger(__name__)


@dataclass
class RawSample:
    """One image before any transform; ``key`` names it in errors and logs, ``name`` is its stable id
    (file path relative to the root, or row index) for outputs.

    Args:
        image: the decoded RGB image (the encoded file's bytes from a source's ``raw``).
        persons: its person records.
        caption: its caption, if the data has one.
        key: its name in errors and logs.
        name: its stable id for outputs.
        persons_not_recorded: persons found in the image whose records were left out (the annotation keeps
            the ``max_persons`` largest faces and counts the rest as ``faces_dropped``, and counts the person boxes
            of its body detector that no face was found for as ``bodies_without_face``): nothing anonymizes them.
    """

    image: Image.Image
    persons: list[dict[str, Any]]
    caption: str | None
    key: str
    name: str = ""
    persons_not_recorded: int = 0


def read_raw(source: Any, index: int) -> RawSample:
    """Sample ``index`` of ``source`` with its image as stored: the encoded file's bytes where the source keeps files
    (its ``raw`` method), else the decoded image.

    Args:
        source: a sample source.
        index: the sample.
    """
    raw = getattr(source, "raw", None)
    return raw(index) if raw is not None else source[index]


class SampleSource(Protocol):
    """Indexable samples; ``skipped`` counts rows left out up front, by reason; ``fingerprint`` identifies
    the data (for cache keys)."""

    skipped: Counter[str]

    def __len__(self) -> int: ...

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data (file hashes, seeds, settings), for cache keys."""
        ...

    def __getitem__(self, index: int) -> RawSample: ...


@dataclass(frozen=True)
class RejectedRow:
    """A sidecar line that cannot be used: where it is (``file:line``), a short reason label, and the detail.

    Args:
        where: ``file:line`` of the row.
        reason: a short label.
        detail: what is wrong.
        name: the row's image name, when it has one.
    """

    where: str
    reason: str
    detail: str
    name: str | None = None  # the row's image name, when it has one


def screen_rows(
    rows: list[dict[str, Any]],
    schema: AttributeSchema | Mapping[str, Any] | None,
    name: str,
    exists: Callable[[dict[str, Any]], bool] | None = None,
    rejected: Sequence[RejectedRow] = (),
    max_skipped_fraction: float = 1.0,
) -> tuple[list[dict[str, Any]], Counter[str], list[RejectedRow]]:
    """Keep the sidecar rows that can train; every other row is skipped, counted by reason and logged once per
    reason with its first example. ``rejected``: rows the reader already refused (malformed line, no ``file``).

    Raises :class:`~camouflage_train.errors.DataError` when no row is usable, or when the share of faulty rows
    (all skipped rows but those the annotation recorded as unreadable images) exceeds ``max_skipped_fraction``:
    a mostly broken sidecar is a mistake to fix, not to train on.

    Args:
        rows: the sidecar's rows.
        schema: the attribute schema to validate records against (``None``: no check).
        name: the source's name in messages.
        exists: whether a row's image exists (``None``: not checked).
        rejected: rows the reader already refused.
        max_skipped_fraction: the largest share of rows that may be skipped.
    """
    parsed = as_schema(schema) if schema is not None else None
    kept: list[dict[str, Any]] = []
    dropped = list(rejected)
    for row in rows:
        problem = None
        if row.get("skipped"):
            problem = (f"annotation: {row['skipped']}", _where_and_file(row))
        elif exists is not None and not exists(row):
            problem = ("missing file", _where_and_file(row))
        elif parsed is not None:
            try:
                for i, person in enumerate(row["persons"]):
                    parsed.validate(person, f"{row['_where']}, person {i}")
            except InvalidRecordError as err:
                problem = (f"person record: {err.reason}", str(err))
        if problem is None:
            kept.append(row)
        else:
            dropped.append(RejectedRow(row["_where"], *problem, name=row.get("file")))
    skipped: Counter[str] = Counter(row.reason for row in dropped)
    examples: dict[str, str] = {}
    for row in dropped:
        examples.setdefault(row.reason, row.detail)
    report = "; ".join(f"{reason}: {count} (first: {examples[reason]})" for reason, count in skipped.most_common())
    for reason, count in skipped.most_common():
        log.warning("%s: skipping %d row(s): %s (first: %s)", name, count, reason, examples[reason])
    total = len(rows) + len(rejected)
    if not kept:
        raise DataError(f"{name}: no usable rows out of {total}" + (f" ({report})" if report else ""))
    # Images the annotation could not read are already reported by annotate.py; the limit is about rows that
    # are wrong in the sidecar itself or point nowhere.
    faulty = sum(1 for row in dropped if not row.reason.startswith("annotation: "))
    if faulty > max_skipped_fraction * total:
        raise DataError(
            f"{name}: {faulty} of {total} rows ({faulty / total:.1%}) cannot be used, more than "
            f"max_skipped_fraction={max_skipped_fraction:g} of the source allows: {report}. Fix the sidecar, or "
            "raise the source's max_skipped_fraction (e.g. data.train_source.max_skipped_fraction=0.2)"
        )
    return kept, skipped, dropped


def _readable_version(version: Any) -> bool:
    """A row's ``schema_version`` this reader knows: missing (``None``, NaN: version 1) or a whole number in
    ``1..RECORD_SCHEMA_VERSION`` (``2.0`` from a float column counts)."""
    if version is None or (isinstance(version, float) and math.isnan(version)):
        return True
    if isinstance(version, bool) or not isinstance(version, (int, float)) or not float(version).is_integer():
        return False
    return 1 <= int(version) <= RECORD_SCHEMA_VERSION


def read_sidecar(path: str | Path) -> tuple[list[dict[str, Any]], list[RejectedRow]]:
    """Read person-record rows from ``.jsonl`` or ``.parquet``: the rows with a ``persons`` list (each gets
    ``_where`` = ``file:line``), and the lines that are not such rows (malformed JSON, not an object, no list).

    Args:
        path: the sidecar file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"person-record sidecar not found: {path}")
    lines: list[tuple[int, Any]] = []
    rejected: list[RejectedRow] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        lines = list(enumerate(pq.read_table(path).to_pylist(), start=1))
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    lines.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    rejected.append(RejectedRow(f"{path}:{number}", "malformed JSON", f"{path}:{number}: {err.msg}"))
    else:
        raise DataError(f"{path}: a person-record sidecar must be .jsonl or .parquet")
    rows = []
    for number, row in lines:
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            rejected.append(RejectedRow(where, "not a JSON object", f"{where}: each line must be a JSON object"))
        elif not isinstance(row.get("persons"), list):
            detail = f"{where}: field 'persons' must be a list of person records"
            rejected.append(RejectedRow(where, "no 'persons' list", detail, name=_file_of(row)))
        elif not _readable_version(row.get("schema_version")):
            detail = (
                f"{where}: schema_version {row['schema_version']!r} is not one this camouflage-train reads "
                f"(1..{RECORD_SCHEMA_VERSION}): written by a newer version; upgrade camouflage-train"
            )
            rejected.append(RejectedRow(where, "newer record version", detail, name=_file_of(row)))
        else:
            rows.append({**row, "_where": where})
    return rows, rejected


def check_sidecars(data: Mapping[str, Any], sources: Sequence[str] = ("train_source", "val_source")) -> None:
    """Check, before any model or dataset is loaded, that every person-record sidecar ``data`` names exists.

    One :class:`InputError` lists each missing file with the ``annotate.py`` command that writes it.

    Args:
        data: the ``data`` config (``data.<source>.sidecar`` keys are read).
        sources: which sources the run will read (evaluation reads only the validation source).
    """
    problems = []
    for key in sources:
        source = data.get(key) or {}
        sidecar = source.get("sidecar") if isinstance(source, Mapping) else None
        if sidecar is None or Path(str(sidecar)).expanduser().is_file():
            continue
        where = (
            f"input.dataset={source['path']} input.split={source.get('split', 'train')}"
            if "path" in source
            else f"input.folder={source.get('root', '<images>')}"
        )
        problems.append(
            f"data.{key}.sidecar: '{sidecar}' does not exist; write it with "
            f"`python annotate.py {where} output={sidecar}`"
        )
    if problems:
        raise InputError("missing person records:\n  " + "\n  ".join(problems))


def _count(value: Any) -> int:
    """A row's count field (``faces_dropped``); absent or not a count: 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _file_of(row: dict[str, Any]) -> str | None:
    return row["file"] if isinstance(row.get("file"), str) else None


def _where_and_file(row: dict[str, Any]) -> str:
    """``sidecar:line (image)``: a row as errors and warnings name it."""
    return row["_where"] + (f" ({_file_of(row)})" if _file_of(row) else "")


class SyntheticSource:
    """``num_samples`` scenes drawn from ``seed + index``; deterministic, no files. ``face_size``: the range of
    face box widths as fractions of the image width (the miniature world's models were trained on the default).

    Args:
        schema: the attribute schema the scenes' persons follow.
        num_samples: how many scenes.
        resolution: their size in pixels.
        seed: scene ``i`` is drawn from ``seed + i``.
        min_persons: the fewest persons per scene.
        face_size: the range of face box widths, as fractions of the image width.
    """

    def __init__(
        self,
        schema: AttributeSchema | Mapping[str, Any],
        num_samples: int,
        resolution: int,
        seed: int = 0,
        min_persons: int = 1,
        face_size: Sequence[float] = FACE_SIZE,
    ) -> None:
        self.schema = as_schema(schema)
        self.num_samples, self.resolution, self.seed, self.min_persons = num_samples, resolution, seed, min_persons
        self.face_size = check_face_size(face_size)
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return self.num_samples

    def fingerprint(self) -> dict[str, Any]:
        """The seed, count and drawing settings: everything the scenes depend on."""
        return {
            "type": "synthetic",
            "num_samples": self.num_samples,
            "resolution": self.resolution,
            "seed": self.seed,
            "min_persons": self.min_persons,
            "schema": self.schema.to_config(),
            "face_size": list(self.face_size),
            "world": WORLD_VERSION,  # scenes drawn by an older renderer are never read back
        }

    def __getitem__(self, index: int) -> RawSample:
        image, persons = draw_scene(
            self.seed + index, self.schema, self.resolution, self.min_persons, face_size=self.face_size
        )
        return RawSample(
            image=image,
            persons=persons,
            caption=None,
            key=f"synthetic:{self.seed + index}",
            name=f"{self.seed + index:08d}.png",
        )


class FolderSource:
    """Images under ``root`` listed by a sidecar whose rows are ``{"file", "persons", "caption"?}``.

    Rows that cannot train are left out up front and counted in ``skipped`` by reason (malformed lines, no
    ``file``, names leaving ``root``, missing images, with ``schema`` invalid records); more than
    ``max_skipped_fraction`` of all rows is an error. Unreadable images are found (and skipped) when loaded.

    Args:
        root: the image folder.
        sidecar: the person-record file (``.jsonl`` or ``.parquet``).
        caption_field: the rows' caption field.
        schema: the attribute schema to validate records against.
        min_image_size: images with a shorter side are skipped when read.
        max_skipped_fraction: the largest share of rows that may be skipped up front.
    """

    def __init__(
        self,
        root: str | Path,
        sidecar: str | Path,
        caption_field: str = "caption",
        schema: AttributeSchema | Mapping[str, Any] | None = None,
        min_image_size: int = 8,
        max_skipped_fraction: float = 0.05,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"image folder not found: {self.root}")
        rows, rejected = read_sidecar(sidecar)
        self.caption_field, self.min_image_size = caption_field, min_image_size
        usable = []
        for row in rows:
            name = row.get("file")
            if not isinstance(name, str) or not name:
                detail = f"{row['_where']}: field 'file' (image path relative to {self.root}) is required"
                rejected.append(RejectedRow(row["_where"], "no 'file' field", detail))
            elif Path(name).is_absolute() or ".." in Path(name).parts:
                detail = f"{row['_where']}: 'file' must stay inside {self.root}, got {name!r}"
                rejected.append(RejectedRow(row["_where"], "unsafe file name", detail, name=name))
            else:
                usable.append(row)
        self.rows, self.skipped, dropped = screen_rows(
            usable,
            schema,
            str(sidecar),
            lambda r: (self.root / r["file"]).is_file(),
            rejected,
            max_skipped_fraction,
        )
        self.dropped = [(row.name or row.where, row.reason) for row in dropped]
        self.sidecar = Path(sidecar)

    def name_of(self, index: int) -> str:
        """The image file of row ``index``, relative to ``root``.

        Args:
            index: the row.
        """
        return self.rows[index]["file"]

    def fingerprint(self) -> dict[str, Any]:
        """The sidecar's content hash, the rows kept and the settings."""
        return {
            "type": "folder",
            "root": str(self.root.resolve()),
            "sidecar_sha256": file_sha256(self.sidecar),
            "rows": len(self.rows),
            "caption_field": self.caption_field,
            "min_image_size": self.min_image_size,
        }

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> RawSample:
        sample = self.raw(index)
        sample.image = load_rgb(sample.image, self.min_image_size)
        return sample

    def raw(self, index: int) -> RawSample:
        """Row ``index`` with its image file's bytes as they are on disk, not decoded (what shards store).

        Args:
            index: the row.
        """
        row = self.rows[index]
        path = self.root / row["file"]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BadSampleError("missing file", f"{path}: {error}") from error
        return RawSample(
            image=data,
            persons=list(row["persons"]),
            caption=row.get(self.caption_field),
            key=_where_and_file(row),
            name=row["file"],
            # faces cut by max_persons, and persons the body detector saw without a face: neither is anonymized
            persons_not_recorded=_count(row.get("faces_dropped")) + _count(row.get("bodies_without_face")),
        )


class HFDatasetSource:
    """A ``datasets`` dataset; persons from ``persons_column`` or from a sidecar of ``{"index", "persons"}`` rows.

    Args:
        path: the ``datasets`` repository id or local folder.
        split: the split to read.
        image_column: the image column.
        persons_column: a column of person-record lists (or use ``sidecar``).
        caption_column: a caption column, if any.
        sidecar: a file of ``{index, persons}`` rows (from ``annotate.py``).
        revision: the dataset revision.
        schema: the attribute schema to validate records against.
        min_image_size: images with a shorter side are skipped when read.
        max_skipped_fraction: the largest share of rows that may be skipped up front.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str = "image",
        persons_column: str | None = "persons",
        caption_column: str | None = None,
        sidecar: str | Path | None = None,
        revision: str | None = None,
        schema: AttributeSchema | Mapping[str, Any] | None = None,
        min_image_size: int = 8,
        max_skipped_fraction: float = 0.05,
    ) -> None:
        import datasets

        if sidecar is not None and not Path(sidecar).is_file():  # before the dataset's download
            raise InputError(f"person-record sidecar not found: {sidecar}")
        if Path(path, "dataset_info.json").is_file() or Path(path, "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(path)
            self.dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            try:
                self.dataset = datasets.load_dataset(path, split=split, revision=revision)
            except (ConnectionError, *transport_errors()) as error:  # a wrong name or split: datasets' own message
                raise InputError(
                    f"dataset '{path}' is not in the datasets cache and the hub cannot be reached "
                    f"({first_line(error)}). {download_hint(path, revision, 'dataset', [], '')} The folder goes in "
                    "this source's path."
                ) from error
        self.name = f"{path}[{split}]"
        columns = set(self.dataset.column_names)
        needed = [image_column] + ([caption_column] if caption_column else [])
        needed += [] if sidecar else [persons_column or "persons"]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"dataset {self.name}: missing column(s) {missing}; it has {sorted(columns)}")
        self.image_column, self.persons_column, self.caption_column = image_column, persons_column, caption_column
        self.min_image_size = min_image_size
        self.rows: list[dict[str, Any]] | None = None
        self.skipped: Counter[str] = Counter()
        if sidecar is not None:
            rows, rejected = read_sidecar(sidecar)
            usable = []
            for row in rows:
                index = row.get("index")
                if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(self.dataset):
                    usable.append(row)
                else:
                    detail = f"{row['_where']}: 'index' must be a row number of {self.name}, got {index!r}"
                    rejected.append(RejectedRow(row["_where"], "bad 'index'", detail))
            self.rows, self.skipped, _ = screen_rows(
                usable, schema, str(sidecar), rejected=rejected, max_skipped_fraction=max_skipped_fraction
            )
        self.sidecar = Path(sidecar) if sidecar is not None else None
        self.revision = revision

    def fingerprint(self) -> dict[str, Any]:
        """The dataset's own fingerprint, the sidecar's hash and the settings."""
        return {
            "type": "hf",
            "name": self.name,
            "revision": self.revision,
            "data": dataset_fingerprint(self.dataset),
            "sidecar_sha256": file_sha256(self.sidecar) if self.sidecar else None,
            "rows": len(self),
            "columns": [self.image_column, self.persons_column, self.caption_column],
            "min_image_size": self.min_image_size,
        }

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.dataset)

    def name_of(self, index: int) -> str:
        """Sample ``index``'s name (its dataset row, ``00000012.png``), without reading the image.

        Args:
            index: the sample.
        """
        return f"{int(self.rows[index]['index']) if self.rows is not None else index:08d}.png"

    def __getitem__(self, index: int) -> RawSample:
        if self.rows is not None:
            row = self.rows[index]
            item = self.dataset[int(row["index"])]
            persons, key = list(row["persons"]), f"{self.name} row {row['index']} ({row['_where']})"
            row_index = int(row["index"])
        else:
            item = self.dataset[index]
            persons, key, row_index = list(item[self.persons_column]), f"{self.name} row {index}", index
        caption = item[self.caption_column] if self.caption_column else None
        image = load_rgb(item[self.image_column], self.min_image_size)
        return RawSample(image=image, persons=persons, caption=caption, key=key, name=f"{row_index:08d}.png")
