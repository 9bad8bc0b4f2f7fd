"""Write a file or a folder all at once: build it under a hidden temporary name beside the target, rename it
into place when complete. A process killed meanwhile leaves the previous target intact, never a torn one
(checkpoints, anonymized images, exports, caches, presets all go through here). Append-only JSON-lines files
(sidecars, manifests) are the exception: they grow one flushed line at a time, and :func:`cut_torn_tail` removes
the partial last line a killed writer can leave."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
STAGING_MARK = ".tmp-"  # staging names: .<name>.tmp-<pid> (a later run removes those of dead writers)


@contextmanager
def atomic_file(target: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a staging path beside ``target`` to write; on success it replaces ``target``.

    ``durable``: fsync the file and its folder, so the rename survives a power cut (checkpoints); without it
    the write is still all-or-nothing for a killed process.

    Args:
        target: the file to write.
        durable: fsync the file and its folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}{STAGING_MARK}{os.getpid()}")
    try:
        yield staging
        if durable:
            with open(staging, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    if durable:
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@contextmanager
def atomic_folder(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it becomes ``target``.

    A failure leaves nothing behind. If ``target`` appeared meanwhile (another process built the same thing)
    and ``replace`` is false, the existing folder is kept; with ``replace`` it is swapped out. Everything in it
    gets the permissions of a plain ``mkdir``/``open`` under the user's umask: ``mkdtemp`` makes the folder 0700
    and safetensors writes its files 0600, which would leave a shared export or cache unreadable to colleagues.

    Args:
        target: the folder to build.
        replace: swap out a folder that appeared meanwhile.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        follow_umask(staging)
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything under it the default permissions of new files and folders.

    Args:
        folder: the folder.
    """
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def current_umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cut_torn_tail(path: str | Path) -> bytes:
    """Cut a torn last line (a writer killed mid-line) off the append-only lines file ``path``, logging it; return
    the complete lines' bytes (empty when the file does not exist).

    Args:
        path: a JSON-lines file written one flushed line at a time.
    """
    path = Path(path)
    if not path.is_file():
        return b""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
        with path.open("r+b") as handle:
            handle.truncate(end)
    return data[:end]
