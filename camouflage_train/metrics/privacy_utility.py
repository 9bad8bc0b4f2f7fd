"""The privacy-utility figure of anonymization papers: re-identification (privacy; lower is better) against
utility (FID, lower is better; attribute, box and edge agreement, higher is better), one point per evaluated row;
the rows of one sweep (``base@guidance=0``, ``base@guidance=1``, ...) are joined into a curve in sweep order."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

UTILITY_AXES = (
    ("fid", "FID (lower is better)"),
    ("attr/box_iou", "box IoU"),
    ("attr/gender_agreement", "gender agreement"),
    ("struct/edge_iou", "edge IoU (structure kept)"),
)
# One row of panels per privacy measure: rank-1 (the headline number) and the mean cosine similarity between each
# output face and its original (graded: it still moves when rank-1 is already at its floor).
PRIVACY_AXES = (("rank1", "re-ID rank-1"), ("cosine", "identity cosine"))
# Between a swept row's name and its setting: `evaluate.py row_sweep=...` names rows `base@guidance=0.5`.
SWEEP_SEPARATOR = "@"


def plot_privacy_utility(results: Sequence[Mapping[str, Any]], path: str | Path, recogniser: str | None = None):
    """Write the figure to ``path`` (PNG) and return it as a PIL image; ``recogniser``: whose rank-1 and cosine are
    the privacy axes (default: the first one in the results). Rows without a finite value on an axis are left off
    it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if recogniser is None:
        keys = [k for k in results[0] if k.startswith("reid/") and k.endswith("/rank1")] if results else []
        recogniser = keys[0].split("/")[1] if keys else None
    n_rows, n_cols = len(PRIVACY_AXES), len(UTILITY_AXES)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.4 * n_rows), dpi=100, squeeze=False)
    for (measure, measure_label), axis_row in zip(PRIVACY_AXES, axes, strict=True):
        privacy = f"reid/{recogniser}/{measure}"
        for axis, (key, label) in zip(axis_row, UTILITY_AXES, strict=True):
            curves: dict[str, list[tuple[float, float]]] = {}
            for row in results:
                x, y = row.get(key), row.get(privacy)
                if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or not math.isfinite(x + y):
                    continue
                axis.scatter([x], [y], s=30)
                axis.annotate(str(row["model"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
                if SWEEP_SEPARATOR in str(row["model"]):
                    curves.setdefault(str(row["model"]).split(SWEEP_SEPARATOR)[0], []).append((x, y))
            for points in curves.values():
                axis.plot(*zip(*points, strict=True), linewidth=1, alpha=0.6)
            axis.set_xlabel(label)
            axis.set_ylabel(f"{measure_label} ({recogniser}; lower = more private)", fontsize=8)
            axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return Image.open(path).convert("RGB")
