"""The results table of a report, from an evaluation's ``results.json``: one row per evaluated row, the headline
measures with their bootstrap standard errors and the generation time.

    python -m camouflage_train.metrics.report logs/eval_demo/runs/<run>/results.json [--bold light@cfg=3]

prints the Markdown table the mini-world report (``docs/miniworld/``) shows; with ``--grid`` it also cuts the
report's picture out of an evaluation's sample grid (``samples/batch_000.png``: per image the original, then every
row in the table's order), keeping the original and the ``--columns`` rows for the first ``--images`` images.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from camouflage_train.utils.images import with_column_labels

# (column title, result key, format); the recogniser's keys are filled in with the first recogniser's name.
COLUMNS = (
    ("worst-case rank-1, other view", "attack/worst/other_view/rank1", "{:.3f}"),
    ("worst-case rank-1, same image", "attack/worst/same_image/rank1", "{:.3f}"),
    ("face re-ID rank-1", "reid/{rec}/rank1", "{:.3f}"),
    ("verification", "reid/{rec}/verification", "{:.3f}"),
    ("identity cosine", "reid/{rec}/cosine", "{:.3f}"),
    ("detection", "reid/{rec}/detection_rate", "{:.3f}"),
    ("box IoU", "attr/box_iou", "{:.3f}"),
    ("gender agr.", "attr/gender_agreement", "{:.3f}"),
    ("age MAE", "attr/age_mae", "{:.1f}"),
    ("pose MAE", "attr/pose_mae", "{:.1f}"),
    ("edge IoU", "struct/edge_iou", "{:.3f}"),
    ("SSIM", "struct/ssim", "{:.3f}"),
    ("FID", "fid", "{:.2f}"),
    ("s / image", "time/seconds_per_image", "{:.3f}"),
)


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    error = row.get(f"{key}_se")
    text = fmt.format(value)
    if isinstance(error, (int, float)) and math.isfinite(error) and error > 0:
        text += " ± " + fmt.format(error)
    return text


def results_table(results: Sequence[Mapping[str, Any]], bold: Sequence[str] = ()) -> str:
    """The Markdown table of ``results`` (``results.json``'s rows); rows named in ``bold`` are set in bold.

    Args:
        results: the evaluation's rows.
        bold: row names to emphasise (the rows the targets are read on).
    """
    keys = [k for k in results[0] if k.startswith("reid/") and k.endswith("/rank1")] if results else []
    recogniser = keys[0].split("/")[1] if keys else ""
    header = ["row", *(title for title, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results:
        name = f"**{row['model']}**" if row["model"] in bold else str(row["model"])
        cells = [_cell(row, key.format(rec=recogniser), fmt) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def privacy_table(results: Sequence[Mapping[str, Any]], protocol: str) -> str:
    """The Markdown table of every row under every attacker of one protocol (rank-1 ± standard error, over all
    persons), with the attribute floor and which attacker is the worst case.

    Args:
        results: the evaluation's rows.
        protocol: ``same_image`` or ``other_view``.
    """
    suffix = f"/{protocol}/rank1"
    attackers = [
        key.removeprefix("attack/").removesuffix(suffix)
        for key in (results[0] if results else {})
        if key.startswith("attack/") and key.endswith(suffix) and key.split("/")[1] not in ("floor", "worst")
    ]
    header = ["row", *attackers, "worst case", "floor"]
    lines = [f"{protocol.replace('_', ' ')}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results:
        cells = [_cell(row, f"attack/{a}{suffix}", "{:.3f}") for a in attackers]
        worst = f"{_cell(row, f'attack/worst{suffix}', '{:.3f}')} ({row.get(f'attack/worst/{protocol}/attacker', '-')})"
        lines.append(
            "| " + " | ".join([str(row["model"]), *cells, worst, _cell(row, f"attack/floor{suffix}", "{:.3f}")]) + " |"
        )
    return "\n".join(lines)


def select_grid_columns(
    grid: Path, rows: Sequence[str], columns: Sequence[str], images: int, out: Path, tile: int = 64, padding: int = 2
) -> None:
    """Write ``out``: the original and the ``columns`` rows of an evaluation's sample grid, first ``images`` images,
    each column named above it.

    Args:
        grid: ``samples/batch_NNN.png`` of an evaluation (``make_grid`` of original + each row per image).
        rows: the evaluation's rows in order (``results.json``).
        columns: the rows to keep, in the order to show them.
        images: how many images (grid lines) to keep.
        out: the PNG to write.
        tile: the image size in pixels; padding: the grid's padding.
        padding: pixels between the tiles of the grid (``make_grid``'s ``padding``).
    """
    from PIL import Image

    missing = [c for c in columns if c not in rows]
    if missing:
        raise ValueError(f"--columns {missing} are not rows of the evaluation: {list(rows)}")
    source = Image.open(grid).convert("RGB")
    step = tile + padding
    keep = [0] + [1 + list(rows).index(c) for c in columns]
    picture = Image.new("RGB", (len(keep) * step + padding, images * step + padding))
    for line in range(images):
        for position, column in enumerate(keep):
            box = (
                column * step + padding,
                line * step + padding,
                column * step + padding + tile,
                line * step + padding + tile,
            )
            picture.paste(source.crop(box), (position * step + padding, line * step + padding))
    picture = with_column_labels(picture, ["original", *columns], step, padding)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m camouflage_train.metrics.report``: print an evaluation's table, cut a picture from its grid.

    Args:
        argv: the command line (default ``sys.argv``).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="an evaluation's results.json")
    parser.add_argument("--bold", nargs="*", default=(), help="rows to set in bold")
    parser.add_argument("--grid", type=Path, help="an evaluation's samples/batch_NNN.png to cut the picture from")
    parser.add_argument("--columns", nargs="*", default=(), help="the rows to keep in the picture")
    parser.add_argument("--images", type=int, default=8, help="images (lines) in the picture")
    parser.add_argument("--out", type=Path, help="where to write the picture")
    parser.add_argument("--attackers", action="store_true", help="also every row under every attacker, per protocol")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    print(results_table(results, args.bold))
    if args.attackers:
        for protocol in ("other_view", "same_image"):
            if results and f"attack/worst/{protocol}/rank1" in results[0]:
                print("\n" + privacy_table(results, protocol))
    if args.grid:
        if args.out is None:
            parser.error("--grid needs --out")
        select_grid_columns(args.grid, [r["model"] for r in results], args.columns, args.images, args.out)


if __name__ == "__main__":
    main()
