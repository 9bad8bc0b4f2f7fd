"""The privacy-utility figure of anonymization papers: re-identification (privacy; lower is better) against
utility (FID, lower is better; attribute, box and edge agreement, higher is better) and cost (generation seconds
per image), one point per evaluated row;
the rows of one sweep (``base@guidance=0``, ``base@guidance=1``, ...) are joined into a curve in sweep order,
and standard errors (``<key>_se``, :mod:`camouflage_train.metrics.uncertainty`) are drawn as error bars."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

UTILITY_AXES = (
    ("fid", "FID (lower is better; log above 1)"),
    ("attr/box_iou", "box IoU"),
    ("attr/gender_agreement", "gender agreement"),
    ("struct/edge_iou", "edge IoU (structure kept)"),
    ("time/seconds_per_image", "generation s / image (warm; lower is cheaper)"),
)
# One row of panels per privacy measure, those the results have, in this order: the worst-case attacker's rank-1 over
# all persons (the headline: other view, then same image; modules/privacy_attacks.py), then the face recogniser's
# rank-1 beside it ({recogniser}: the first recogniser in the results, or the one asked for): over all persons when
# the attackers ran, else the detector-matched measure of reid/.
PRIVACY_AXES = (
    ("attack/worst/other_view/rank1", "worst-case attacker rank-1, other view"),
    ("attack/worst/same_image/rank1", "worst-case attacker rank-1, same image"),
    ("attack/face:{recogniser}/same_image/rank1", "face recogniser rank-1, same image, all persons ({recogniser})"),
    ("reid/{recogniser}/rank1", "face recogniser rank-1, matched faces ({recogniser})"),
)
# Between a swept row's name and its setting: `evaluate.py row_sweep=...` names rows `base@guidance=0.5`.
SWEEP_SEPARATOR = "@"


def split_row_name(model: Any) -> tuple[str, str, str]:
    """``base@guidance=0.4`` -> (``base``, ``guidance``, ``0.4``); a row outside a sweep -> (name, "", "").

    Args:
        model: a results row's name.
    """
    method, _, setting = str(model).partition(SWEEP_SEPARATOR)
    name, _, value = setting.partition("=")
    return method, name, value


def _value(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def plot_privacy_utility(results: Sequence[Mapping[str, Any]], path: str | Path, recogniser: str | None = None):
    """Write the figure to ``path`` (PNG) and return it as a PIL image: one row of panels per privacy measure of
    :data:`PRIVACY_AXES` the results have (the worst-case attacker first, the face recogniser's rank-1 beside it).
    Rows without a finite value on an axis are left off it. A sweep's rows share one colour, are joined in sweep order
    and labelled by their value; measures with a standard error in the results (``<key>_se``) get error bars.

    Args:
        results: the results rows (``results.json``).
        path: the PNG to write.
        recogniser: whose face rank-1 is drawn (default: the first in the results).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if recogniser is None:
        keys = [k for k in results[0] if k.startswith("reid/") and k.endswith("/rank1")] if results else []
        recogniser = keys[0].split("/")[1] if keys else None
    groups: dict[str, list[Mapping[str, Any]]] = {}  # a plain row alone, a sweep's rows together
    settings: dict[str, str] = {}  # method -> the swept setting's name ("" outside a sweep)
    for row in results:
        method, setting, _ = split_row_name(row["model"])
        groups.setdefault(method, []).append(row)
        settings[method] = setting
    colours = {name: f"C{i % 10}" for i, name in enumerate(groups)}
    privacy_axes = [
        (key.format(recogniser=recogniser), label.format(recogniser=recogniser)) for key, label in PRIVACY_AXES
    ]
    privacy_axes = [(key, label) for key, label in privacy_axes if results and key in results[0]]
    if any(key.startswith("attack/face:") for key, _ in privacy_axes):  # one face panel: the all-persons one
        privacy_axes = [(key, label) for key, label in privacy_axes if not key.startswith("reid/")]
    if not privacy_axes:
        raise ValueError(f"the results have none of the privacy measures {[k for k, _ in PRIVACY_AXES]}")
    n_rows, n_cols = len(privacy_axes), len(UTILITY_AXES)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.6 * n_rows), dpi=100, squeeze=False)
    for (privacy, measure_label), axis_row in zip(privacy_axes, axes, strict=True):
        for axis, (key, label) in zip(axis_row, UTILITY_AXES, strict=True):
            for name, rows in groups.items():
                points = [(row, _value(row, key), _value(row, privacy)) for row in rows]
                points = [(row, x, y) for row, x, y in points if x is not None and y is not None]
                if not points:
                    continue
                xs, ys = [x for _, x, _ in points], [y for _, _, y in points]
                axis.errorbar(
                    xs,
                    ys,
                    xerr=[_value(row, f"{key}_se") or 0.0 for row, _, _ in points],
                    yerr=[_value(row, f"{privacy}_se") or 0.0 for row, _, _ in points],
                    color=colours[name],
                    marker="o",
                    markersize=4,
                    linewidth=1 if len(points) > 1 else 0,
                    elinewidth=0.6,
                    alpha=0.8,
                    label=name,
                )
                for row, x, y in points:  # a sweep's points by their value, the others by name
                    text = split_row_name(row["model"])[2] if settings[name] else name
                    axis.annotate(text, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            if key == "fid":  # a blur's FID is 10-30x a generator's: linear up to 1, logarithmic beyond
                axis.set_xscale("symlog", linthresh=1.0)
            axis.set_xlabel(label)
            axis.set_ylabel(f"{measure_label}\n(lower = more private)", fontsize=8)
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    labels = [f"{name} ({settings[name]})" if settings.get(name) else name for name in labels]
    figure.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return Image.open(path).convert("RGB")
