"""Image -> person records with insightface ``FaceAnalysis`` (detector, 5 keypoints, gender/age).

Persons are faces for now: ``box`` is the face box. The record keeps the detection score and the
normalized keypoints so later versions can add body boxes without breaking readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from camouflage_train.annotation.head_pose import head_pose
from camouflage_train.errors import UserError

RECORD_SCHEMA_VERSION = 1
GENDERS = ("female", "male")  # insightface: gender 0 = female, 1 = male


class FaceModelUnavailableError(UserError, OSError):
    """The insightface model pack cannot be found or downloaded."""


class FaceAnnotator:
    """Detect faces and describe each as a person record.

    Args:
        model_name: an insightface pack name (``buffalo_l``, ``antelopev2``) looked up under
            ``<model_root>/models/``, or a folder of ONNX models.
        model_root: insightface's model root.
        det_size: detector input size (width, height).
        det_thresh: detection score threshold.
        providers: onnxruntime execution providers (``None``: insightface's default).
        ctx_id: device id for insightface (``-1`` CPU).
    """

    def __init__(
        self,
        model_name: str = "buffalo_l",
        model_root: str = "~/.insightface",
        det_size: Sequence[int] = (640, 640),
        det_thresh: float = 0.5,
        providers: Sequence[str] | None = None,
        ctx_id: int = 0,
    ) -> None:
        from insightface.app import FaceAnalysis

        kwargs: dict[str, Any] = {"providers": list(providers)} if providers else {}
        modules = ["detection", "genderage"]
        try:
            self.app = FaceAnalysis(
                name=model_name, root=str(Path(model_root).expanduser()), allowed_modules=modules, **kwargs
            )
        except Exception as err:  # insightface raises requests/zip/assert errors for a missing pack
            raise FaceModelUnavailableError(
                f"insightface model pack '{model_name}' is not available under {model_root}/models and could not be "
                f"downloaded ({type(err).__name__}: {err}). Unpack it there (e.g. buffalo_l.zip from the insightface "
                f"model zoo, non-commercial licence) or pass faces.model_name=<folder with the .onnx files>."
            ) from err
        missing = {"detection", "genderage"} - set(self.app.models)
        if missing:
            raise FaceModelUnavailableError(f"insightface pack '{model_name}' has no {sorted(missing)} model")
        self.app.prepare(ctx_id=ctx_id, det_size=tuple(det_size), det_thresh=det_thresh)
        self.model_name, self.model_root, self.ctx_id = model_name, model_root, ctx_id
        self.providers = list(providers) if providers else None

    def detect(self, image: Image.Image) -> tuple[np.ndarray, list[Any]]:
        """The BGR array insightface works on and its ``Face`` objects (pixel boxes, keypoints, gender, age)."""
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return bgr, self.app.get(bgr)

    def __call__(self, image: Image.Image) -> list[dict[str, Any]]:
        """Person records for an RGB image, largest face first."""
        width, height = image.size
        records = []
        for face in self.detect(image)[1]:
            x0, y0, x1, y1 = (float(v) for v in face.bbox)
            box = [
                min(max(x0 / width, 0.0), 1.0),
                min(max(y0 / height, 0.0), 1.0),
                min(max(x1 / width, 0.0), 1.0),
                min(max(y1 / height, 0.0), 1.0),
            ]
            if not (box[0] < box[2] and box[1] < box[3]):
                continue
            # From the keypoints (one convention for every model pack), see head_pose.py.
            yaw, pitch, roll = head_pose(face.kps, width, height)
            records.append(
                {
                    "box": [round(v, 5) for v in box],
                    "age": float(np.clip(face.age, 0, 100)),
                    "gender": GENDERS[int(face.gender)],
                    "yaw": round(yaw, 2),
                    "pitch": round(pitch, 2),
                    "roll": round(roll, 2),
                    "det_score": round(float(face.det_score), 4),
                    "kps": [[round(float(x) / width, 5), round(float(y) / height, 5)] for x, y in face.kps],
                }
            )
        records.sort(key=lambda r: (r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1]), reverse=True)
        return records
