"""Lightning callbacks of the framework."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class DataHealthMonitor(L.Callback):
    """Report unusable samples once per epoch and stop a run that only sees unusable data.

    Sources count rows left out up front (``source.skipped``); the collate function counts samples skipped
    while loading (``batch["skipped"]``). Both are logged as ``data/skipped`` and summarised by reason at
    the end of each epoch. ``max_consecutive_empty`` batches in a row with no usable sample raise an error.
    """

    def __init__(self, max_consecutive_empty: int = 20) -> None:
        self.max_consecutive_empty = max_consecutive_empty
        self.epoch_skipped: Counter[str] = Counter()
        self.epoch_used = 0
        self.consecutive_empty = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        for name in ("train_source", "val_source"):
            skipped = getattr(getattr(datamodule, name, None), "skipped", None)
            if skipped:
                log.warning("%s: %d row(s) left out before training: %s", name, sum(skipped.values()), dict(skipped))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        skipped = batch.get("skipped", {}) if isinstance(batch, dict) else {}
        self.epoch_skipped.update(skipped)
        size = int(batch.get("size", 1)) if isinstance(batch, dict) else 1
        self.epoch_used += size
        self.consecutive_empty = self.consecutive_empty + 1 if size == 0 else 0
        if self.consecutive_empty >= self.max_consecutive_empty:
            raise RuntimeError(
                f"{self.consecutive_empty} consecutive training batches had no usable sample "
                f"(skipped this epoch by reason: {dict(self.epoch_skipped)}); check the dataset"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epoch_skipped:
            log.warning(
                "epoch %d: used %d samples, skipped %d: %s",
                trainer.current_epoch,
                self.epoch_used,
                sum(self.epoch_skipped.values()),
                dict(self.epoch_skipped),
            )
        if self.epoch_used == 0 and self.epoch_skipped:
            raise RuntimeError(f"no usable training sample in a whole epoch: {dict(self.epoch_skipped)}")
        self.epoch_skipped.clear()
        self.epoch_used = 0


class ExportAdapter(L.Callback):
    """Opt-in: at the end of training, write the export folder (see :mod:`camouflage_train.export`) from the
    final weights. Only rank 0 writes."""

    def __init__(
        self, output: str, enabled: bool = False, base_model: str | None = None, overwrite: bool = False
    ) -> None:
        self.output, self.enabled, self.base_model, self.overwrite = output, enabled, base_model, overwrite

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        import tempfile
        from pathlib import Path

        from camouflage_train.export import export_adapter

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(tmp) / "final.ckpt"
            trainer.save_checkpoint(checkpoint)  # collective: every rank calls it
            if trainer.is_global_zero:
                export_adapter(checkpoint, self.output, base_model=self.base_model, overwrite=self.overwrite)
                log.info("exported the adapter to %s", self.output)
