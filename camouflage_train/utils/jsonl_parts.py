"""Per-process parts of a JSON-lines file (a manifest, a person-record sidecar) written by a distributed job.

Each process appends its rows to a part of its own beside the target, ``<stem>.rank-<rank>.<suffix>`` (e.g.
``manifest.rank-00001.jsonl``), one flushed line at a time: no two processes ever write one file. When every
process is done, one of them folds the parts into the target with :func:`merge_parts` and removes them. A job
killed before that leaves its parts; the next run folds them in first, so their rows count as done (a torn last
line of a part, like one of the target, is cut off by :func:`~camouflage_train.utils.atomic.cut_torn_tail`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from camouflage_train.utils.atomic import cut_torn_tail

PART_MARK = ".rank-"


def part_file(target: str | Path, rank: int) -> Path:
    """The part of ``target`` that process ``rank`` writes.

    Args:
        target: the merged file (``manifest.jsonl``).
        rank: the process's global rank.
    """
    target = Path(target)
    return target.with_name(f"{target.stem}{PART_MARK}{rank:05d}{target.suffix}")


def part_files(target: str | Path) -> list[Path]:
    """The parts of ``target`` that exist now, by rank.

    Args:
        target: the merged file.
    """
    target = Path(target)
    pattern = re.compile(re.escape(target.stem + PART_MARK) + r"\d+" + re.escape(target.suffix) + "$")
    if not target.parent.is_dir():
        return []
    return sorted(path for path in target.parent.iterdir() if pattern.fullmatch(path.name))


def complete_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file, read without changing it: a last line without its newline (a writer killed
    mid-line) is not a row even if it parses, and a line that is not a JSON object is left out.

    Args:
        path: the file (absent: no rows).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows = []
    for line in data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def rows_with_parts(target: str | Path) -> list[dict[str, Any]]:
    """The complete rows of ``target`` and of its parts (a killed job's), read without changing any file.

    Args:
        target: the merged file.
    """
    return [row for path in [Path(target), *part_files(target)] for row in complete_rows(path)]


def append_rows(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append ``rows`` to ``path``, one line each, and flush them to disk.

    Args:
        path: the JSON-lines file (created when absent).
        rows: the rows.
    """
    with Path(path).open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def merge_parts(target: str | Path, order: Callable[[dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
    """Fold every part of ``target`` into it and remove the parts; return the rows added, in the order written.

    A part row the target already holds, line for line, is left out: a merge killed after appending and before
    removing the parts is done again without duplicates (a job never writes a row the target has: it skips the
    inputs the target names). Torn last lines are cut first.

    Args:
        target: the merged file (created when absent and some part has rows).
        order: the sort key of the rows added (``None``: by rank, then as each process wrote them).
    """
    target = Path(target)
    parts = part_files(target)
    if not parts:
        return []
    held = set(cut_torn_tail(target).decode("utf-8").splitlines())
    added = []
    for part in parts:
        for line in cut_torn_tail(part).decode("utf-8").splitlines():
            if line in held:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                added.append(row)
    if order is not None:
        added.sort(key=order)
    if added:
        append_rows(target, added)
    for part in parts:
        part.unlink(missing_ok=True)
    return added
