"""The privacy-utility figure of anonymization papers: re-identification (privacy; lower is better) against
utility (FID, lower is better; attribute and box agreement, higher is better), one point per evaluated row."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

UTILITY_AXES = (
    ("fid", "FID (lower is better)"),
    ("attr/box_iou", "box IoU"),
    ("attr/gender_agreement", "gender agreement"),
)


def plot_privacy_utility(results: Sequence[Mapping[str, Any]], path: str | Path, recogniser: str | None = None):
    """Write the figure to ``path`` (PNG) and return it as a PIL image; ``recogniser``: whose rank-1 is the privacy
    axis (default: the first one in the results). Rows without a finite value on an axis are left off it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if recogniser is None:
        keys = [k for k in results[0] if k.startswith("reid/") and k.endswith("/rank1")] if results else []
        recogniser = keys[0].split("/")[1] if keys else None
    privacy = f"reid/{recogniser}/rank1"
    figure, axes = plt.subplots(1, len(UTILITY_AXES), figsize=(4.2 * len(UTILITY_AXES), 3.6), dpi=100)
    for axis, (key, label) in zip(axes, UTILITY_AXES, strict=True):
        for row in results:
            x, y = row.get(key), row.get(privacy)
            if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or not math.isfinite(x + y):
                continue
            axis.scatter([x], [y], s=30)
            axis.annotate(str(row["model"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel(f"re-ID rank-1 ({recogniser}; lower = more private)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return Image.open(path).convert("RGB")
