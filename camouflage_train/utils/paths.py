"""Output paths built from data (file names in datasets and sidecars) must stay inside their folder."""

from __future__ import annotations

from pathlib import Path


class UnsafePathError(ValueError):
    """A relative name would leave its target folder (``..``, an absolute path, a symlink out)."""


def inside(root: str | Path, name: str | Path) -> Path:
    """``root / name`` after checking that it resolves inside ``root``."""
    root = Path(root).resolve()
    target = (root / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(root):
        raise UnsafePathError(f"output name '{name}' escapes '{root}'")
    return target
