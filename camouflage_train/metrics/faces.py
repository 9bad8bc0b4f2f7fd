"""Faces of an image for evaluation: boxes, gender/age, head pose and one embedding per recogniser."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from camouflage_train.annotation.faces import FaceAnnotator, FaceModelUnavailableError, resolve_pack
from camouflage_train.annotation.head_pose import head_pose


@dataclass
class FaceSet:
    """What the analyzer found in one image.

    Args:
        boxes: ``[F, 4]`` pixel boxes.
        ages: ``[F]`` estimated ages.
        genders: ``[F]`` estimated genders (class indices).
        poses: ``[F, 3]`` yaw, pitch, roll in degrees.
        embeddings: recogniser name -> ``[F, D]`` identity embeddings.
    """

    boxes: np.ndarray  # [F, 4] pixels
    ages: np.ndarray  # [F]
    genders: np.ndarray  # [F]
    poses: np.ndarray  # [F, 3] yaw, pitch, roll
    embeddings: dict[str, np.ndarray]  # recogniser -> [F, D]


def _load_recogniser(model: str, model_root: str, ctx_id: int, providers: list[str] | None) -> Any:
    """An insightface recognition model from an ONNX file or from a pack (name or folder)."""
    from insightface.app import FaceAnalysis
    from insightface.model_zoo import model_zoo

    kwargs = {"providers": list(providers)} if providers else {}
    try:
        if model.endswith(".onnx"):
            if not Path(model).is_file():
                raise FileNotFoundError(model)
            recogniser = model_zoo.get_model(model, **kwargs)
        else:
            pack = FaceAnalysis(
                name=resolve_pack(model, model_root),
                root=str(Path(model_root).expanduser()),
                allowed_modules=["detection", "recognition"],
                **kwargs,
            )
            recogniser = pack.models.get("recognition")
        if recogniser is None or getattr(recogniser, "taskname", None) != "recognition":
            raise ValueError(f"'{model}' holds no face recognition model (112x112 -> embedding)")
    except Exception as err:
        raise FaceModelUnavailableError(
            f"re-identification: recogniser '{model}' is not available ({type(err).__name__}: {err}). Put the pack "
            f"under {model_root}/models/<name> (e.g. buffalo_l, antelopev2; non-commercial licence) or give an ONNX "
            f"file (112x112 input) in metrics.recognisers.<name>.model."
        ) from err
    recogniser.prepare(ctx_id)
    return recogniser


class FaceAnalyzer:
    """Detector + gender/age (an insightface pack) and several recognisers, run on one image at a time.

    Args:
        detector: the ``faces=`` annotator (its model root, device and providers serve the recognisers too).
        recognisers: name -> ``{model: pack name, folder or .onnx file, threshold}``.
    """

    def __init__(self, detector: FaceAnnotator, recognisers: Mapping[str, Mapping[str, Any]]) -> None:
        """``detector``: the ``faces=`` annotator (its model root, device and providers serve the recognisers too);
        ``recognisers``: name -> ``{model: pack name, folder or .onnx file, threshold}``."""
        self.detector = detector
        root, ctx_id, providers = str(detector.model_root), int(detector.ctx_id), detector.providers
        self.recognisers = {
            name: _load_recogniser(str(spec["model"]), root, ctx_id, providers) for name, spec in recognisers.items()
        }
        self.thresholds = {name: float(spec.get("threshold", 0.3)) for name, spec in recognisers.items()}

    def __call__(self, image: Image.Image) -> FaceSet:
        bgr, faces = self.detector.detect(image)
        width, height = image.size
        embeddings = {
            name: np.stack([rec.get(bgr, face) for face in faces]) if faces else np.zeros((0, 1))
            for name, rec in self.recognisers.items()
        }
        return FaceSet(
            boxes=np.array([f.bbox for f in faces], dtype=np.float64).reshape(-1, 4),
            ages=np.array([float(f.age) for f in faces]),
            genders=np.array([int(f.gender) for f in faces]),
            poses=np.array([head_pose(f.kps, width, height) for f in faces]).reshape(-1, 3),
            embeddings=embeddings,
        )
