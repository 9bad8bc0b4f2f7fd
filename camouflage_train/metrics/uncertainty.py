"""How far an evaluation's numbers would move on other images: bootstrap standard errors over images.

A table of 64 images gives gender agreement from ~130 face pairs; its sampling error (~0.03) is as large as
many differences a user wants to read off it. Resampling *images* (not faces) keeps the faces of one scene
together, as they are not independent (one generation, one layout). Computed from the per-face records of
:func:`camouflage_train.modules.evaluation_module.face_record`, so every process of a multi-GPU evaluation
gives the same numbers once the records are gathered. Rank-1 needs the whole gallery and is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def _image_sums(record: Mapping[str, Any], recognisers: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Each measure as (numerator, denominator) of one image, keyed like the aggregate result it matches."""
    matched = [face for face in record["faces"] if face["output"] is not None]
    pairs = float(len(matched))

    def over_pairs(value: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]) -> tuple[float, float]:
        return float(sum(value(face, face["output"]) for face in matched)), pairs

    sums = {
        "attr/box_iou": (float(sum(r["iou"] for r in record["requested"])), float(len(record["requested"]))),
        "attr/gender_agreement": over_pairs(lambda o, a: o["gender"] == a["gender"]),
        "attr/age_mae": over_pairs(lambda o, a: abs(o["age"] - a["age"])),
        "attr/pose_mae": over_pairs(lambda o, a: np.abs(np.subtract(o["pose"], a["pose"])).mean()),
    }
    for rec in recognisers:
        sums[f"reid/{rec}/detection_rate"] = (pairs, float(len(record["faces"])))
        sums[f"reid/{rec}/cosine"] = over_pairs(lambda o, a, rec=rec: a["cosine"][rec])
    return sums


def bootstrap_values(
    records: Iterable[Mapping[str, Any]],
    recognisers: Sequence[str] = (),
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Per row and result key, the measure on ``resamples`` draws of the row's images with replacement.

    Keys as in ``results.json``: ``attr/box_iou``, ``attr/gender_agreement``, ``attr/age_mae``,
    ``attr/pose_mae`` (from the records' poses, rounded to 4 decimals) and, per
    recogniser, ``reid/<name>/detection_rate`` and ``reid/<name>/cosine``. The same ``seed`` draws the same
    image indices for every row holding the same images, so ``values[a][k] - values[b][k]`` is the paired
    bootstrap of the difference between rows ``a`` and ``b``. NaN for a resample without a matched face and for
    a row of one image.

    Args:
        records: the evaluation's per-image records (``faces.jsonl``).
        recognisers: the recognisers whose re-identification keys to include.
        resamples: bootstrap draws.
        seed: their seed.
    """
    by_row: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_row.setdefault(str(record["row"]), []).append(record)
    out: dict[str, dict[str, np.ndarray]] = {}
    for row, rows in by_row.items():
        sums = [_image_sums(r, recognisers) for r in sorted(rows, key=lambda r: str(r["image"]))]
        if len(sums) < 2:  # resampling one image says nothing about other images
            out[row] = {key: np.full(resamples, np.nan) for key in sums[0]}
            continue
        rng = np.random.default_rng(seed)
        # counts[b, i]: how often image i is drawn in resample b.
        counts = rng.multinomial(len(sums), np.full(len(sums), 1.0 / len(sums)), size=resamples).astype(np.float64)
        out[row] = {}
        for key in sums[0]:
            numerator = np.array([s[key][0] for s in sums])
            denominator = np.array([s[key][1] for s in sums])
            with np.errstate(invalid="ignore", divide="ignore"):
                out[row][key] = (counts @ numerator) / (counts @ denominator)
    return out


def bootstrap_standard_errors(
    records: Iterable[Mapping[str, Any]],
    recognisers: Sequence[str] = (),
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per row, ``{result key: standard error}`` (see :func:`bootstrap_values`); NaN where a row has fewer than
    two images or fewer than two resamples with a matched face.

    Args:
        records: the evaluation's per-image records (``faces.jsonl``).
        recognisers: the recognisers whose re-identification keys to include.
        resamples: bootstrap draws.
        seed: their seed.
    """
    errors: dict[str, dict[str, float]] = {}
    for row, values in bootstrap_values(records, recognisers, resamples, seed).items():
        finite = {key: draws[np.isfinite(draws)] for key, draws in values.items()}
        errors[row] = {key: float(d.std(ddof=1)) if len(d) > 1 else float("nan") for key, d in finite.items()}
    return errors
