"""Hydra callback: after a multirun, one table of each run's overrides against its final metrics.

A training run leaves ``metrics.json`` (one set of final metrics); an evaluation run leaves ``results.json`` (one
set per table row), so an evaluation multirun gets one line per run and row."""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def job_folders(sweep: Path) -> list[Path]:
    """The runs of a multirun folder (``<sweep>/<job number>/``), in job order.

    Args:
        sweep: a multirun folder.
    """
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def varied_overrides(runs: Sequence[Path]) -> list[str]:
    """Each run's command-line overrides (``.hydra/overrides.yaml``) less those every run shares.

    Args:
        runs: the runs' folders.
    """
    overrides = []
    for run in runs:
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides.append(yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else [])
    shared = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    return [" ".join(o for o in own if o not in shared) for own in overrides]


def run_results(run: Path) -> list[tuple[str | None, dict[str, Any]]]:
    """``[(row, metrics)]`` of one run: each row of an evaluation's ``results.json``, or ``(None, metrics.json)``
    of a training run; empty when the run left neither (it failed).

    Args:
        run: one run's folder.
    """
    results_file, metrics_file = run / "results.json", run / "metrics.json"
    if results_file.is_file():
        return [(str(row.get("model")), row) for row in json.loads(results_file.read_text())]
    if metrics_file.is_file():
        return [(None, json.loads(metrics_file.read_text()))]
    return []


def _columns(patterns: Iterable[str], results: Iterable[Mapping[str, Any]]) -> list[str]:
    """The metric keys the patterns (exact keys or ``fnmatch`` patterns such as ``reid/*/rank1``) select, in
    pattern order; an exact key is kept even where no run has it (it shows as n/a)."""
    keys = list(dict.fromkeys(key for metrics in results for key in metrics))
    columns: list[str] = []
    for pattern in patterns:
        matched = (
            [key for key in keys if fnmatch.fnmatchcase(key, pattern)]
            if any(c in pattern for c in "*?[")
            else [pattern]
        )
        columns += [key for key in matched if key not in columns]
    return columns


class MultirunSummary(Callback):
    """Writes ``summary.md`` and ``summary.json`` in the sweep folder (runs in ``<sweep>/<job number>/``).

    Args:
        metrics: the columns, exact keys or ``fnmatch`` patterns (``reid/*/rank1``: every recogniser's rank-1).
    """

    def __init__(self, metrics: list[str] | None = None) -> None:
        self.metrics = list(metrics or ["val/loss", "train/loss", "model/trainable_params"])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        folders = job_folders(sweep)
        runs = [(run, own, run_results(run)) for run, own in zip(folders, varied_overrides(folders), strict=True)]
        if not runs:
            return
        columns = _columns(self.metrics, (metrics for *_, results in runs for _, metrics in results))
        with_rows = any(row is not None for *_, results in runs for row, _ in results)
        lines = []
        for run, overrides, results in runs:
            for row, metrics in results or [(None, {})]:
                line: dict[str, Any] = {"run": run.name}
                if with_rows:
                    line["row"] = row or ""
                line["overrides"] = overrides
                line.update({key: metrics.get(key, "failed" if not results else "n/a") for key in columns})
                lines.append(line)
        (sweep / "summary.json").write_text(json.dumps(lines, indent=2))
        header = list(lines[0])
        table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        table += ["| " + " | ".join(_cell(line[c]) for c in header) + " |" for line in lines]
        (sweep / "summary.md").write_text("\n".join(table) + "\n")
        log.info("multirun summary (%s):\n%s", sweep / "summary.md", "\n".join(table))


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
