"""Choose the adaptive attacker's settings on selection scenes, by the rule of docs/evaluation.md:

    python scripts/select_attacker.py logs/regen/attack-selection/attack_readings.pkl

(the readings of ``evaluate.py experiment=eval_demo 'rows=[identity,base,light]' row_sweep=null
data.val_source.seed=2000000``). Prints every setting's mean other-view rank-1 over the rows and the one kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging

import numpy as np

from camouflage_train.modules.privacy_attacks import PrivacyAttacks
from camouflage_train.modules.reid_attacker import AdaptiveAttackerConfig

GRID = {"steps": [50, 150, 400], "lr": [1e-2, 3e-2], "temperature": [0.05, 0.1]}
TIE = 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("readings")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    scores = {}
    for values in itertools.product(*GRID.values()):
        setting = dict(zip(GRID, values, strict=True))
        cfg = dataclasses.replace(AdaptiveAttackerConfig(), **setting)
        attacks = PrivacyAttacks(adaptive=cfg).load(args.readings)
        rows = list(dict.fromkeys(r for p in attacks.persons.values() for r in p.outputs))
        results = attacks.results(rows)
        per_row = [results[row]["attack/adaptive/other_view/rank1"] for row in rows]
        scores[values] = float(np.mean(per_row))
        print(
            f"{setting}: "
            + " ".join(f"{r}={v:.3f}" for r, v in zip(rows, per_row, strict=True))
            + f" mean={scores[values]:.3f}"
        )
    best = max(scores.values())
    kept = min((v for v in scores if scores[v] >= best - TIE), key=lambda v: (v[0], -scores[v]))
    print(f"kept: {dict(zip(GRID, kept, strict=True))} (mean other-view rank-1 {scores[kept]:.3f}; best {best:.3f})")


if __name__ == "__main__":
    main()
