"""Write a folder all at once: build it under a hidden temporary name, rename it into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it becomes ``target``.

    A failure leaves nothing behind. If ``target`` appeared meanwhile (another process built the same thing)
    and ``replace`` is false, the existing folder is kept; with ``replace`` it is swapped out. The folder gets
    the permissions of a plain ``mkdir`` under the user's umask (``mkdtemp`` alone would leave it 0700, so a
    shared export or cache would be unreadable to colleagues).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        yield staging
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def current_umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
