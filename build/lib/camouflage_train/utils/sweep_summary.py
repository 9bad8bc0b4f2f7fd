"""Hydra callback: after a multirun, one table of each run's overrides against its final metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class MultirunSummary(Callback):
    """Writes ``summary.md`` and ``summary.json`` in the sweep folder (runs in ``<sweep>/<job number>/``)."""

    def __init__(self, metrics: list[str] | None = None) -> None:
        self.metrics = list(metrics or ["val/loss", "train/loss", "model/trainable_params"])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        runs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if not runs:
            return
        overrides = []
        for run in runs:
            overrides_file = run / ".hydra" / "overrides.yaml"
            overrides.append(yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else [])
        shared = set.intersection(*(set(o) for o in overrides))  # show only what the sweep varies
        rows = []
        for run, run_overrides in zip(runs, overrides, strict=True):
            metrics_file = run / "metrics.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
            rows.append(
                {
                    "run": run.name,
                    "overrides": " ".join(o for o in run_overrides if o not in shared),
                    **{m: metrics.get(m, "failed" if not metrics else "n/a") for m in self.metrics},
                }
            )
        (sweep / "summary.json").write_text(json.dumps(rows, indent=2))
        columns = list(rows[0])
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
        (sweep / "summary.md").write_text("\n".join(lines) + "\n")
        log.info("multirun summary (%s):\n%s", sweep / "summary.md", "\n".join(lines))
