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
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from camouflage_train.data.images import load_rgb
from camouflage_train.data.schema import AttributeSchema, InvalidRecordError, as_schema
from camouflage_train.data.synthetic import draw_scene

log = logging.getLogger(__name__)


@dataclass
class RawSample:
    """One image before any transform; ``key`` names it in errors and logs, ``name`` is its stable id
    (file path relative to the root, or row index) for outputs."""

    image: Image.Image
    persons: list[dict[str, Any]]
    caption: str | None
    key: str
    name: str = ""


class SampleSource(Protocol):
    """Indexable samples; ``skipped`` counts rows left out up front, by reason; ``fingerprint`` identifies
    the data (for cache keys)."""

    skipped: Counter[str]

    def __len__(self) -> int: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def __getitem__(self, index: int) -> RawSample: ...


def screen_rows(
    rows: list[dict[str, Any]], schema: AttributeSchema | Mapping[str, Any] | None, name: str, exists: Any = None
) -> tuple[list[dict[str, Any]], Counter[str], list[tuple[dict[str, Any], str]]]:
    """Drop sidecar rows that cannot train (annotation skipped them, image missing, invalid person record),
    counting each reason and logging the first example of each; an empty result is an error."""
    parsed = as_schema(schema) if schema is not None else None
    kept, skipped, examples, dropped = [], Counter(), {}, []
    for row in rows:
        reason = None
        if row.get("skipped"):
            reason = f"annotation: {row['skipped']}"
        elif exists is not None and not exists(row):
            reason = "missing file"
        elif parsed is not None:
            try:
                for i, person in enumerate(row["persons"]):
                    parsed.validate(person, f"{row['_where']}, person {i}")
            except InvalidRecordError as err:
                reason = "invalid person record"
                examples.setdefault(reason, str(err))
        if reason is None:
            kept.append(row)
        else:
            skipped[reason] += 1
            dropped.append((row, reason))
            examples.setdefault(reason, row["_where"])
    for reason, count in skipped.items():
        log.warning("%s: skipping %d row(s): %s (first: %s)", name, count, reason, examples[reason])
    if not kept:
        raise ValueError(f"{name}: no usable rows out of {len(rows)} ({dict(skipped)})")
    return kept, skipped, dropped


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_sidecar(path: str | Path) -> list[dict[str, Any]]:
    """Read person-record rows from ``.jsonl`` or ``.parquet``; a malformed row names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"person-record sidecar not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: each line must be a JSON object")
                row["_line"] = number
                rows.append(row)
    else:
        raise ValueError(f"{path}: sidecar must be .jsonl or .parquet")
    for number, row in enumerate(rows, start=1):
        where = f"{path}:{row.get('_line', number)}"
        if not isinstance(row.get("persons"), list):
            raise ValueError(f"{where}: field 'persons' must be a list of person records")
        row["_where"] = where
    return rows


class SyntheticSource:
    """``num_samples`` scenes drawn from ``seed + index``; deterministic, no files."""

    def __init__(
        self,
        schema: AttributeSchema | Mapping[str, Any],
        num_samples: int,
        resolution: int,
        seed: int = 0,
        min_persons: int = 1,
    ) -> None:
        self.schema = as_schema(schema)
        self.num_samples, self.resolution, self.seed, self.min_persons = num_samples, resolution, seed, min_persons
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return self.num_samples

    def fingerprint(self) -> dict[str, Any]:
        return {
            "type": "synthetic",
            "num_samples": self.num_samples,
            "resolution": self.resolution,
            "seed": self.seed,
            "min_persons": self.min_persons,
            "schema": self.schema.to_config(),
        }

    def __getitem__(self, index: int) -> RawSample:
        image, persons = draw_scene(self.seed + index, self.schema, self.resolution, self.min_persons)
        return RawSample(
            image=image,
            persons=persons,
            caption=None,
            key=f"synthetic:{self.seed + index}",
            name=f"{self.seed + index:08d}.png",
        )


class FolderSource:
    """Images under ``root`` listed by a sidecar whose rows are ``{"file", "persons", "caption"?}``.

    With ``schema``, rows whose image is missing or whose records are invalid are left out up front
    and counted in ``skipped``; unreadable images are found (and skipped) when loaded.
    """

    def __init__(
        self,
        root: str | Path,
        sidecar: str | Path,
        caption_field: str = "caption",
        schema: AttributeSchema | Mapping[str, Any] | None = None,
        min_image_size: int = 8,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        rows = read_sidecar(sidecar)
        self.caption_field, self.min_image_size = caption_field, min_image_size
        for row in rows:
            if not isinstance(row.get("file"), str):
                raise ValueError(f"{row['_where']}: field 'file' (image path relative to {self.root}) is required")
            if Path(row["file"]).is_absolute() or ".." in Path(row["file"]).parts:
                raise ValueError(f"{row['_where']}: 'file' must stay inside {self.root}, got {row['file']!r}")
        self.rows, self.skipped, dropped = screen_rows(
            rows, schema, str(sidecar), lambda r: (self.root / r["file"]).is_file()
        )
        self.dropped = [(row["file"], reason) for row, reason in dropped]
        self.sidecar = Path(sidecar)

    def name_of(self, index: int) -> str:
        return self.rows[index]["file"]

    def fingerprint(self) -> dict[str, Any]:
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
        row = self.rows[index]
        return RawSample(
            image=load_rgb(self.root / row["file"], self.min_image_size),
            persons=list(row["persons"]),
            caption=row.get(self.caption_field),
            key=f"{row['_where']} ({row['file']})",
            name=row["file"],
        )


class HFDatasetSource:
    """A ``datasets`` dataset; persons from ``persons_column`` or from a sidecar of ``{"index", "persons"}`` rows."""

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
    ) -> None:
        import datasets

        if Path(path, "dataset_info.json").is_file() or Path(path, "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(path)
            self.dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            self.dataset = datasets.load_dataset(path, split=split, revision=revision)
        self.name = f"{path}[{split}]"
        columns = set(self.dataset.column_names)
        needed = [image_column] + ([caption_column] if caption_column else [])
        needed += [] if sidecar else [persons_column or "persons"]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"dataset {self.name}: missing column(s) {missing}; it has {sorted(columns)}")
        self.image_column, self.persons_column, self.caption_column = image_column, persons_column, caption_column
        self.min_image_size = min_image_size
        self.rows: list[dict[str, Any]] | None = None
        self.skipped: Counter[str] = Counter()
        if sidecar is not None:
            rows = read_sidecar(sidecar)
            for row in rows:
                index = row.get("index")
                if not isinstance(index, int) or not 0 <= index < len(self.dataset):
                    raise ValueError(f"{row['_where']}: 'index' must be a row number of {self.name}, got {index!r}")
            self.rows, self.skipped, _ = screen_rows(rows, schema, str(sidecar))
        self.sidecar = Path(sidecar) if sidecar is not None else None
        self.revision = revision

    def fingerprint(self) -> dict[str, Any]:
        return {
            "type": "hf",
            "name": self.name,
            "revision": self.revision,
            "data": self.dataset._fingerprint,
            "sidecar_sha256": file_sha256(self.sidecar) if self.sidecar else None,
            "rows": len(self),
            "columns": [self.image_column, self.persons_column, self.caption_column],
            "min_image_size": self.min_image_size,
        }

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.dataset)

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
