"""Measure a mini face pack through insightface's own code on held-out scenes (what ``build.json`` reports).

Detection: visible faces (at least half uncovered) found at IoU >= 0.5, mean IoU of the matches and false
detections per scene; attributes of the matched faces (gender accuracy, age MAE, old/young split); identity:
rank-1 of two views of each held-out identity (another place, size, pose, background) among all identities, with
the second view as drawn and as encoded and decoded by the base's VAE (what a generated face is at best).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from camouflage_train.data.synthetic import draw_scene
from camouflage_train.metrics.reid import box_iou
from camouflage_train.miniworld.face_pack import (
    RECOGNISER,
    FaceBuildConfig,
    degrade,
    identity_views,
    visible_fraction,
)
from camouflage_train.miniworld.scenes import face_schema

HELD_OUT_SCENES = 4_000_000


def face_pack_report(
    folder: str | Path, num_scenes: int = 200, num_identities: int = 200, seed: int = 1, base: str = "preset:mini"
) -> dict:
    """Held-out checks of a mini face pack: detection, gender and age on fresh scenes, and re-identification of fresh
    identities drawn twice.

    Args:
        folder: the face pack.
        num_scenes: fresh scenes for detection and attributes.
        num_identities: fresh identities for re-identification.
        seed: the scenes' and identities' seed.
        base: the base whose VAE the second identity views pass through.
    """
    from insightface.model_zoo import model_zoo
    from scipy.optimize import linear_sum_assignment

    from camouflage_train.annotation.faces import FaceAnnotator

    folder = Path(folder)
    detector = FaceAnnotator(str(folder), det_size=(64, 64), providers=["CPUExecutionProvider"], ctx_id=-1)
    rng = np.random.default_rng(seed)
    schema = face_schema()
    report: dict[str, Any] = {}
    for condition in ("clean", "degraded"):
        found, ious, false, genders, ages, old_ages, total = 0, [], 0, [], [], [], 0
        for s in range(HELD_OUT_SCENES, HELD_OUT_SCENES + num_scenes):
            image, persons = draw_scene(s, schema, 64)
            if condition == "degraded":
                image = degrade(image, rng)
            keep = [p for p, v in zip(persons, visible_fraction(persons, 64), strict=True) if v >= 0.5]
            faces = detector.detect(image)[1]
            truth = np.array([p["box"] for p in keep]).reshape(-1, 4) * 64
            iou = box_iou(truth, np.array([f.bbox for f in faces]).reshape(-1, 4))
            total += len(keep)
            matched = 0
            if iou.size:
                for r, c in zip(*linear_sum_assignment(-iou), strict=True):
                    if iou[r, c] >= 0.5:
                        matched += 1
                        ious.append(iou[r, c])
                        genders.append(int(faces[c].gender) == int(keep[r]["gender"] == "male"))
                        ages.append(abs(faces[c].age - keep[r]["age"]))
                        if keep[r]["age"] > 45:
                            old_ages.append(ages[-1])
            found += matched
            false += len(faces) - matched
        report[condition] = {
            "faces": total,
            "detection_rate": found / max(1, total),
            "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "false_detections_per_scene": false / num_scenes,
            "gender_accuracy": float(np.mean(genders)) if genders else 0.0,
            "age_mae": float(np.mean(ages)) if ages else float("nan"),
            "age_mae_over_45": float(np.mean(old_ages)) if old_ages else float("nan"),
        }
    recogniser = model_zoo.get_model(str(folder / RECOGNISER), providers=["CPUExecutionProvider"])
    embed = lambda crops: recogniser.get_feat([c[:, :, ::-1] for c in crops])  # noqa: E731  (BGR, as insightface)
    report["recogniser"] = {"identities": num_identities}
    for suffix, decoded in (("", 0.0), ("_decoded", 1.0)):
        cfg = FaceBuildConfig(base=base, num_identities=num_identities, decoded_views=decoded)
        views = identity_views(cfg, np.random.default_rng(seed + 7))
        a, b = embed(views[:, 0]), embed(views[:, 1])
        a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
        similarity = a @ b.T
        others = (similarity.sum() - np.trace(similarity)) / (num_identities**2 - num_identities)
        report["recogniser"] |= {
            f"rank1_other_view{suffix}": float((similarity.argmax(1) == np.arange(num_identities)).mean()),
            f"mean_cosine_same{suffix}": float(np.diag(similarity).mean()),
            f"mean_cosine_other{suffix}": float(others),
        }
    return report
