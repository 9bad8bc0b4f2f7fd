"""The trainer plugin that writes checkpoints atomically and reads them without unpickling code.

:class:`AtomicCheckpointIO` writes ``.<name>.tmp-<pid>``, fsyncs it and renames it over ``<name>``
(:func:`~camouflage_train.utils.atomic.atomic_file`), so a process killed mid-write leaves the previous file
intact and never a torn one under the real name; it reads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from camouflage_train.utils.atomic import atomic_file
from camouflage_train.utils.checkpoints import CheckpointError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with temp-file + fsync + rename saves and ``weights_only`` loads (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote filesystems: Lightning's own transactional save
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path, durable=True) as staging:
            torch.save(checkpoint, staging)
        return None

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(f"refusing to load '{path}' with weights_only=False (arbitrary code in pickles)")
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
