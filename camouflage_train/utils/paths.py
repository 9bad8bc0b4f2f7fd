"""Paths: output names built from data (file names in datasets and sidecars) must stay inside their folder;
input paths are checked before any work; files are identified by content hash."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from camouflage_train.errors import InputError


class UnsafePathError(ValueError):
    """A relative name would leave its target folder (``..``, an absolute path, a symlink out)."""


def inside(root: str | Path, name: str | Path) -> Path:
    """``root / name`` after checking that it resolves inside ``root``.

    Args:
        root: the folder.
        name: a relative name from the data.
    """
    root = Path(root).resolve()
    target = (root / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(root):
        raise UnsafePathError(f"output name '{name}' escapes '{root}'")
    return target


def check_input_paths(expected: Mapping[str, tuple[str | Path | None, str]]) -> None:
    """``{config key: (path or None, "file" | "folder")}``: raise one :class:`InputError` naming every given path
    that does not exist or is not of its kind; ``None`` (not set) is skipped. Run before any work starts.

    Args:
        expected: ``{config key: (path or None, "file" | "folder")}``.
    """
    problems = []
    for key, (path, kind) in expected.items():
        if path is None or str(path) == "":
            continue
        found = Path(str(path)).expanduser()
        if not found.exists():
            problems.append(f"{key}: '{path}' does not exist")
        elif kind == "file" and not found.is_file():
            problems.append(f"{key}: '{path}' is not a file")
        elif kind == "folder" and not found.is_dir():
            problems.append(f"{key}: '{path}' is not a folder")
    if problems:
        raise InputError("missing input:\n  " + "\n  ".join(problems))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, read in 1 MiB chunks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
