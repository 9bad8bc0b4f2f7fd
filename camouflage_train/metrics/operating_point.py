"""Choose an anonymizer's operating point from evaluation sweeps, by a rule fixed before looking at the numbers.

Each evaluation run holds sweeps of one setting (``base@guidance=0``, ``base@guidance=0.4``, ...; the first row of a
sweep is its reference, e.g. no guidance); several runs differ in another setting (a Hydra multirun over
``anonymizers.base.strength``). A candidate is a swept row; it is *feasible* when, against its sweep's reference,
structure falls by at most ``max_structure_fall``, faces are still detected (``min_detection``) and the reference
itself keeps the scene (``min_reference``). The choice is the feasible candidate with the largest fall of
re-identification; candidates within ``tie`` of that fall count as equal, and the one with the smallest swept value
(the weakest setting) wins. A privacy bound (``--floor``, ``--max-above-floor``: the privacy measure at most that
far above the row's attribute floor, e.g. the worst-case attacker's) and utility limits (``--limit
attr/box_iou>=0.5``) make more candidates infeasible; ``--include-reference`` makes each sweep's reference a
candidate too (a sweep of a setting with no natural "off"). Bounds and ranking compare point estimates, not their
standard errors; across runs, ties go to the smallest swept value, then the most private. Run it on scenes that no
reported number uses::

    python evaluate.py -m experiment=eval_demo rows=[base] data.val_source.seed=6000000 \\
        'row_sweep=[{row: base, key: anonymization.scale, name: guidance, values: [0, 0.8, 1.2, 1.6, 2.4]}]' \\
        anonymizers.base.strength=0.2,0.25,0.3,0.35,0.5
    python -m camouflage_train.metrics.operating_point logs/eval_demo/multiruns/<date>
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from camouflage_train.metrics.privacy_utility import split_row_name
from camouflage_train.utils.sweep_summary import job_folders, run_results, varied_overrides


@dataclass(frozen=True)
class Candidate:
    """One swept row measured against its sweep's reference row (same run, same images and seeds).

    Args:
        run: what sets this run apart from the others (its overrides); empty for a single run.
        row: the swept row, e.g. ``base@guidance=1.2``.
        reference: its sweep's first row, e.g. ``base@guidance=0``.
        value: the swept value.
        privacy: this row's privacy measure (lower: more private).
        privacy_fall: the reference's privacy measure minus this row's.
        structure_fall: the reference's structure measure minus this row's.
        detection: this row's face detection rate.
        reference_structure: the reference row's structure measure.
        reference_detection: the reference row's detection rate.
        infeasible: why the row breaks the rule; empty when it is feasible.
    """

    run: str  # what sets this run apart from the others (its overrides), "" for a single run
    row: str  # e.g. base@guidance=1.2
    reference: str  # e.g. base@guidance=0
    value: float  # the swept value
    privacy: float
    privacy_fall: float
    structure_fall: float
    detection: float
    reference_structure: float
    reference_detection: float
    infeasible: str  # why not, "" when feasible


@dataclass(frozen=True)
class Rule:
    """The selection rule. Defaults: the mini world's targets (structure may fall by 0.1 of edge IoU; faces found in
    ≥ 80 % of cases; the unguided reference keeps SSIM ≥ 0.6) and a tie of 0.01 of rank-1.

    Args:
        privacy: the privacy key: a results key or fnmatch pattern (``*`` is the first recogniser found).
        structure: the structure key.
        max_structure_fall: the most the structure measure may fall below the reference.
        detection: the detection-rate key.
        min_detection: the lowest detection rate allowed.
        reference_key: a measure the reference row must reach (the sweep is usable at all).
        min_reference: the lowest value of ``reference_key`` allowed.
        tie: privacy falls within this of the best count as ties (the smallest value wins).
        floor: the key of the privacy measure's floor (what attributes alone reach); empty: no privacy bound.
        max_above_floor: the most the privacy measure may exceed ``floor`` (with ``floor``).
        limits: utility limits, ``key>=value`` or ``key<=value`` (``attr/box_iou>=0.5``).
        include_reference: each sweep's reference row is a candidate too (its falls are 0).
        absolute: rank by the privacy measure itself (the lowest wins, ``tie`` around it) instead of its fall from
            the sweep's reference, so candidates of different runs compare on one scale.
    """

    privacy: str = "reid/*/rank1"  # a results key or fnmatch pattern (* is the recogniser: the first one found)
    structure: str = "struct/edge_iou"
    max_structure_fall: float = 0.1
    detection: str = "reid/*/detection_rate"
    min_detection: float = 0.8
    reference_key: str = "struct/ssim"
    min_reference: float = 0.6
    tie: float = 0.01
    floor: str = ""
    max_above_floor: float = math.inf
    limits: tuple[str, ...] = ()
    include_reference: bool = False
    absolute: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", tuple(self.limits))
        for limit in self.limits:
            _parse_limit(limit)


def _parse_limit(limit: str) -> tuple[str, str, float]:
    """``key>=value`` / ``key<=value`` -> ``(key, op, value)``, or a ValueError naming the limit."""
    for op in (">=", "<="):
        key, found, value = limit.partition(op)
        if found and key:
            try:
                return key.strip(), op, float(value)
            except ValueError:
                break
    raise ValueError(f"limit '{limit}': expected KEY>=NUMBER or KEY<=NUMBER (e.g. attr/box_iou>=0.5)")


def _resolve(key: str, row: Mapping[str, Any]) -> str:
    """A results key, or the first key the ``fnmatch`` pattern matches (``reid/*/rank1``: the first recogniser)."""
    found = [k for k in row if fnmatch.fnmatchcase(k, key)]
    if not found:
        raise KeyError(f"no results key matches '{key}' (keys: {sorted(row)})")
    return found[0]


def _number(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _swept_value(model: Any) -> float:
    """The number after ``=`` in ``base@guidance=1.2``; NaN for a setting that is not a number."""
    try:
        return float(split_row_name(model)[2])
    except ValueError:
        return math.nan


def candidates(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], rule: Rule) -> list[Candidate]:
    """Every swept row of every run, measured against the first row of its sweep.

    Args:
        runs: ``(run name, results rows)`` pairs.
        rule: the selection rule.
    """
    found = []
    for run, rows in runs:
        sweeps: dict[str, list[Mapping[str, Any]]] = {}
        for row in rows:
            method, setting, _ = split_row_name(row["model"])
            if setting:
                sweeps.setdefault(method, []).append(row)
        for reference, *others in sweeps.values():
            keys = {name: _resolve(getattr(rule, name), reference) for name in ("privacy", "structure", "detection")}
            ref_structure = _number(reference, rule.reference_key)
            ref_detection = _number(reference, keys["detection"])
            for row in [reference, *others] if rule.include_reference else others:
                structure_fall = _number(reference, keys["structure"]) - _number(row, keys["structure"])
                detection = _number(row, keys["detection"])
                reasons = []
                if not structure_fall <= rule.max_structure_fall:
                    reasons.append(f"{keys['structure']} falls {structure_fall:.3f} > {rule.max_structure_fall}")
                if not detection >= rule.min_detection:
                    reasons.append(f"detection {detection:.3f} < {rule.min_detection}")
                if not ref_structure >= rule.min_reference:
                    reasons.append(f"reference {rule.reference_key} {ref_structure:.3f} < {rule.min_reference}")
                if not ref_detection >= rule.min_detection:
                    reasons.append(f"reference detection {ref_detection:.3f} < {rule.min_detection}")
                if rule.floor:
                    privacy, floor = _number(row, keys["privacy"]), _number(row, _resolve(rule.floor, row))
                    if not privacy <= floor + rule.max_above_floor + 1e-9:  # at the bound is within it
                        reasons.append(f"{keys['privacy']} {privacy:.3f} > floor {floor:.3f} + {rule.max_above_floor}")
                for limit in rule.limits:
                    key, op, bound = _parse_limit(limit)
                    value = _number(row, _resolve(key, row))
                    if not (value >= bound if op == ">=" else value <= bound):
                        reasons.append(f"{key} {value:.3f} not {op} {bound}")
                found.append(
                    Candidate(
                        run=run,
                        row=str(row["model"]),
                        reference=str(reference["model"]),
                        value=_swept_value(row["model"]),
                        privacy=_number(row, keys["privacy"]),
                        privacy_fall=_number(reference, keys["privacy"]) - _number(row, keys["privacy"]),
                        structure_fall=structure_fall,
                        detection=detection,
                        reference_structure=ref_structure,
                        reference_detection=ref_detection,
                        infeasible="; ".join(reasons),
                    )
                )
    return found


def choose(found: Sequence[Candidate], tie: float, absolute: bool = False) -> Candidate | None:
    """The feasible candidate with the largest privacy fall (``absolute``: the lowest privacy measure); within
    ``tie`` of it, the smallest swept value, then the most private.

    Args:
        found: the candidates.
        tie: privacy falls (measures) within this of the best are ties.
        absolute: rank by the privacy measure, not its fall.
    """

    def score(c: Candidate) -> float:
        return -c.privacy if absolute else c.privacy_fall

    feasible = [c for c in found if not c.infeasible and math.isfinite(score(c))]
    if not feasible:
        return None
    best = max(score(c) for c in feasible)
    tied = [c for c in feasible if score(c) >= best - tie]
    return min(tied, key=lambda c: (c.value if math.isfinite(c.value) else math.inf, -score(c)))


def load_runs(folders: Sequence[Path]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``(what sets the run apart, its results rows)`` for each evaluation run: a multirun folder stands for its
    runs, any other folder is one run.

    Args:
        folders: evaluation run folders or multirun folders.
    """
    runs: list[Path] = []
    for folder in folders:
        runs += job_folders(folder) if (folder / "multirun.yaml").is_file() else [folder]
    loaded = []
    for run, label in zip(runs, varied_overrides(runs), strict=True):
        rows = [metrics for name, metrics in run_results(run) if name is not None]
        if not rows:
            raise FileNotFoundError(f"{run}: no results.json (not an evaluation run, or it failed)")
        loaded.append((label, rows))
    return loaded


def table(found: Sequence[Candidate], chosen: Candidate | None) -> str:
    """A Markdown table of the candidates, the chosen one marked.

    Args:
        found: the candidates.
        chosen: the chosen one, if any.
    """
    lines = [
        "| run | row | privacy | privacy fall | structure fall | detection | feasible (or why not) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for c in found:
        mark = " **chosen**" if c == chosen else ""
        feasible = c.infeasible or "yes"
        lines.append(
            f"| {c.run} | {c.row}{mark} | {c.privacy:.3f} | {c.privacy_fall:.3f} | {c.structure_fall:.3f} | "
            f"{c.detection:.3f} | {feasible} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> Candidate | None:
    """``python -m camouflage_train.metrics.operating_point``: choose by the rule, print (and write) the table.

    Args:
        argv: the command line (default ``sys.argv``).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="a multirun folder, or evaluation run folders")
    defaults = Rule()
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        elif isinstance(value, tuple):
            parser.add_argument(flag.removesuffix("s"), dest=name, action="append", default=[], metavar="KEY>=VALUE")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=None, help="write operating_point.md/.json here")
    args = parser.parse_args(argv)
    rule = Rule(**{name: getattr(args, name) for name in asdict(defaults)})
    found = candidates(load_runs(args.folders), rule)
    chosen = choose(found, rule.tie, rule.absolute)
    text = table(found, chosen)
    rule_json = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(rule).items()}
    text += f"\nrule: {json.dumps(rule_json)}\nchosen: " + (
        f"{chosen.run} {chosen.row}" if chosen else "none (no feasible candidate)"
    )
    print(text)
    out = args.out or (
        args.folders[0] if len(args.folders) == 1 and (args.folders[0] / "multirun.yaml").is_file() else None
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "operating_point.md").write_text(text + "\n")
        report = {
            "rule": rule_json,
            "chosen": asdict(chosen) if chosen else None,
            "candidates": [asdict(c) for c in found],
        }
        (out / "operating_point.json").write_text(json.dumps(report, indent=2))
    return chosen


if __name__ == "__main__":
    main()
