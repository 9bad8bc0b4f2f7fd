"""Reading training checkpoints safely, and choosing what to resume from (no Lightning needed: inference
and export use it too; the trainer plugin that writes them is :mod:`camouflage_train.utils.checkpoint_io`).

* :func:`read_checkpoint` loads with ``torch.load(weights_only=True)`` (plain tensors and containers only, no
  pickled code) and checks the file is a complete training checkpoint;
* :func:`resolve_checkpoint` turns ``ckpt_path`` (``null``, a file, ``last`` or ``auto``) into a file that
  loads; a checkpoint that does not load (torn by a crash on a filesystem without atomic rename, disk
  full, bit rot) is renamed to ``<name>.corrupt`` with a warning, in favour of the next newest, so the
  run's next saves keep their names (``last.ckpt``, not ``last-v1.ckpt``).
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from camouflage_train.errors import UserError
from camouflage_train.utils.atomic import STAGING_MARK

log = logging.getLogger(__name__)

# Keys every Lightning training checkpoint has (a file without them is not one, whatever it loads as).
_REQUIRED_KEYS = ("state_dict", "global_step", "loops", "optimizer_states")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used; the message names the file and why."""


def _load(path: Path, mmap: bool) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)  # the package's one torch.load


def read_checkpoint(path: str | Path, key: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """Load a training checkpoint on the CPU with ``weights_only=True`` and check it is complete.

    The error never repeats torch's hint to retry with ``weights_only=False``: a file that only loads that way
    is not one of ours, and unpickling it could run arbitrary code. ``key`` names the config key in errors.

    Args:
        path: the checkpoint file.
        key: the config key that names it, for errors.
        mmap: map the tensors instead of reading them (for a look at the metadata: the weights are read only if
            they are touched).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{key}: '{path}' does not exist")
    try:
        try:
            checkpoint = _load(path, mmap)
        except RuntimeError as error:  # torch maps only the zip format; an older file is read in full
            if not (mmap and "mmap" in str(error)):
                raise
            checkpoint = _load(path, False)
    except pickle.UnpicklingError as error:
        what = (
            "it holds pickled Python objects, which are never loaded (they could run code)"
            if "Unsupported global" in str(error)
            else "it is unreadable as a PyTorch checkpoint (torn, truncated or another kind of file)"
        )
        raise CheckpointError(f"{key}: '{path}' is not a training checkpoint: {what}") from None
    except Exception as error:  # a torn zip archive, an empty file, ...
        raise CheckpointError(
            f"{key}: '{path}' is not a training checkpoint: it is unreadable ({type(error).__name__}; torn, "
            "truncated or another kind of file)"
        ) from None
    missing = [name for name in _REQUIRED_KEYS if not isinstance(checkpoint, dict) or name not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{key}: '{path}' is not a training checkpoint of train.py (it has no {', '.join(missing)}): pass a "
            "run's <run>/checkpoints/last.ckpt (or one of its step_*.ckpt)"
        )
    return checkpoint


def checkpoint_folder(trainer: Any, fallback: Path) -> Path:
    """Where ``trainer`` writes checkpoints: its ``ModelCheckpoint``'s folder, else ``fallback``.

    Args:
        trainer: the Lightning trainer.
        fallback: the folder when it has no ``ModelCheckpoint``.
    """
    callback = trainer.checkpoint_callback
    return Path(callback.dirpath) if callback is not None and callback.dirpath else fallback


def resolve_checkpoint(ckpt_path: str | Path | None, checkpoint_dir: Path, move_corrupt: bool = True) -> str | None:
    """The checkpoint file to resume from.

    ``None``: start fresh. A path: that file, which must load. ``last``: the newest loadable checkpoint in
    ``checkpoint_dir`` (by modification time); an error if there is none.
    ``auto``: the same, but start fresh when the folder has none (re-running a killed job's command continues it).
    Unloadable checkpoints of the folder are renamed ``<name>.corrupt`` when ``move_corrupt`` (pass it on rank 0
    only: the other ranks skip them).

    Args:
        ckpt_path: ``None``, ``auto``, ``last`` or a file.
        checkpoint_dir: the run's checkpoint folder.
        move_corrupt: rename unloadable checkpoints (rank 0 only).
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) not in ("last", "auto"):
        read_checkpoint(ckpt_path, key="ckpt_path")
        return str(ckpt_path)
    _remove_stale_staging(checkpoint_dir)
    # Newest first by modification time: a run killed between writing step_N.ckpt and last.ckpt resumes from N.
    files = sorted(checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for index, file in enumerate(files):
        try:
            read_checkpoint(file, key=f"ckpt_path={ckpt_path}")
        except CheckpointError as error:
            following = files[index + 1].name if index + 1 < len(files) else "nothing"
            aside = _move_aside(file) if move_corrupt else None
            moved = f"; moved to {aside.name}" if aside else ""
            log.warning("%s%s; falling back to %s", error, moved, following)
            continue
        log.info("resuming from %s", file)
        return str(file)
    if str(ckpt_path) == "last":
        raise CheckpointError(f"ckpt_path=last: no loadable checkpoint in '{checkpoint_dir}' ({len(files)} found)")
    return None


def _move_aside(file: Path) -> Path | None:
    """Rename an unloadable checkpoint to ``<name>.corrupt`` (``.corrupt-1``, ... if taken): kept for inspection,
    out of the way of the resumed run's saves and of ``ls checkpoints/last.ckpt``."""
    target, number = file.with_name(f"{file.name}.corrupt"), 0
    while target.exists():
        number += 1
        target = file.with_name(f"{file.name}.corrupt-{number}")
    try:
        file.rename(target)
    except FileNotFoundError:  # another process moved it first
        return None
    return target


def _remove_stale_staging(checkpoint_dir: Path) -> None:
    """Delete temp files of saves that were killed mid-write (their writer process is gone)."""
    for staging in checkpoint_dir.glob(f".*{STAGING_MARK}*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.warning("removing %s, left by a save that was interrupted", staging)
            staging.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
