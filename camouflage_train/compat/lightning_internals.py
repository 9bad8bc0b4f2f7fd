"""The Lightning internals the project uses: the CSV logger's experiment writer and its private hooks.

Lightning's ``ExperimentWriter`` deletes an existing ``metrics.csv`` in its private ``_check_log_dir_exists`` and
writes through its private filesystem handle ``_fs``; ``CSVLogger`` keeps its writer in ``_experiment``. A run
that resumes into its own folder needs the file continued instead, which only those hooks allow.
"""

from __future__ import annotations

import csv
import logging
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)


class ContinuingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued instead of deleted: at the
    first save, old rows from the first newly logged step on are dropped (the resumed run logs them again)."""

    def _check_log_dir_exists(self) -> None:
        self._previous: list[dict[str, str]] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self._previous = list(csv.DictReader(file))

    def save(self) -> None:
        if self._previous is not None and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [row for row in self._previous if _step(row) < first]
            self._previous = None
            if kept:
                self.metrics_keys = sorted(set().union(*kept))
                with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                    writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(kept)
            else:
                self._fs.rm_file(self.metrics_file_path)
            log.info("%s: continuing after %d earlier row(s)", self.metrics_file_path, len(kept))
        super().save()


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that continues the run folder's ``metrics.csv`` (see :class:`ContinuingExperimentWriter`) and
    writes rows when they are logged (Lightning's default buffers 100 steps, which a killed run loses).

    Args:
        flush_logs_every_n_steps: write rows to disk every this many steps (1: at once).
    """

    def __init__(self, *args: Any, flush_logs_every_n_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
