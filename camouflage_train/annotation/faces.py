"""Image -> person records with insightface ``FaceAnalysis`` (detector, 5 keypoints, gender/age).

Persons are faces: ``box`` is the face box, and the record keeps the detection score and the normalized
keypoints. Record schema versions (the sidecar rows' ``schema_version``): 1, faces only; 2, a record may also
carry ``body``, the person's whole extent (a normalized box that contains the face box), which a body detector
adds (:mod:`.bodies`, matched to the faces). Version 1 rows, rows written with ``bodies=none`` and faces no body
was matched to have no ``body``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from camouflage_train.annotation.head_pose import head_pose
from camouflage_train.errors import UserError

log = logging.getLogger(__name__)

GENDERS = ("female", "male")  # insightface: gender 0 = female, 1 = male


class FaceModelUnavailableError(UserError, OSError):
    """The insightface model pack cannot be found or downloaded."""


def resolve_pack(model_name: str, model_root: str | Path) -> str:
    """The name or folder to give insightface's ``FaceAnalysis`` for a pack, accepting both layouts of its zips.

    ``antelopev2.zip`` holds a folder, so unpacking it into ``<root>/models/antelopev2/`` (as insightface's own
    download does) gives ``<root>/models/antelopev2/antelopev2/*.onnx``, which ``FaceAnalysis(name="antelopev2")``
    refuses; ``buffalo_l.zip`` unpacks flat. A pack (or folder) without ``.onnx`` files but with one inner folder
    that has them resolves to that inner folder.

    Args:
        model_name: a pack name under ``<model_root>/models/`` or a folder of ``.onnx`` files.
        model_root: insightface's model root.
    """
    given = Path(model_name).expanduser()
    folder = given if given.is_dir() else Path(model_root).expanduser() / "models" / model_name
    if not folder.is_dir() or any(folder.glob("*.onnx")):
        return str(given) if given.is_dir() else model_name
    inner = [sub for sub in folder.iterdir() if sub.is_dir() and any(sub.glob("*.onnx"))]
    return str(inner[0]) if len(inner) == 1 else model_name


def check_providers(providers: Sequence[str] | None, key: str = "faces.providers") -> list[str] | None:
    """Check the requested onnxruntime execution providers against those installed.

    The plain ``onnxruntime`` package has only the CPU provider; given ``CUDAExecutionProvider`` it runs on the CPU
    without a word. None of the requested providers installed is an error; some of them missing is a warning.

    Args:
        providers: onnxruntime provider names, in order of preference (``None``: insightface's default).
        key: the config key, for messages.
    """
    if not providers:
        return None
    import onnxruntime

    available = set(onnxruntime.get_available_providers())
    missing = [name for name in providers if name not in available]
    if missing:
        fix = (
            "for CUDA install onnxruntime-gpu instead of onnxruntime (`pip uninstall -y onnxruntime && pip install "
            "onnxruntime-gpu`, or the project's faces-gpu extra)"
            if any("CUDA" in name or "Tensorrt" in name for name in missing)
            else "install the onnxruntime build that has them"
        )
        message = f"{key}: {missing} not available in the installed onnxruntime (it has {sorted(available)}); {fix}"
        if len(missing) == len(providers):
            raise FaceModelUnavailableError(message)
        log.warning("%s; using %s", message, [name for name in providers if name in available])
    return list(providers)


def gpu_provider_options(providers: Sequence[str] | None, device_id: int) -> dict[str, Any]:
    """The ``providers`` and ``provider_options`` that put onnxruntime's CUDA provider on GPU ``device_id`` (with
    ``providers`` ``None``: CUDA, then CPU, as far as installed); ``{}`` when CUDA is not among them.

    Args:
        providers: the checked provider names (``None``: not given).
        device_id: the CUDA device.
    """
    import onnxruntime

    chosen = list(providers) if providers else []
    if not chosen:
        available = onnxruntime.get_available_providers()
        chosen = [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider") if name in available]
    if "CUDAExecutionProvider" not in chosen:
        return {}
    options = [{"device_id": device_id} if name == "CUDAExecutionProvider" else {} for name in chosen]
    return {"providers": chosen, "provider_options": options}


class FaceAnnotator:
    """Detect faces and describe each as a person record.

    Args:
        model_name: an insightface pack name (``buffalo_l``, ``antelopev2``) looked up under
            ``<model_root>/models/``, or a folder of ONNX models.
        model_root: insightface's model root.
        det_size: detector input size (width, height).
        det_thresh: detection score threshold.
        providers: onnxruntime execution providers (``None``: insightface's default).
        ctx_id: the GPU insightface runs on (``-1``: the CPU); ``annotate.py`` and ``anonymize.py`` set it to each
            process's GPU.
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

        providers = check_providers(providers)
        kwargs: dict[str, Any] = {"providers": providers} if providers else {}
        if ctx_id > 0:  # insightface leaves onnxruntime's CUDA provider on its first GPU: name the one asked for
            kwargs.update(gpu_provider_options(providers, ctx_id))
        modules = ["detection", "genderage"]
        try:
            self.app = FaceAnalysis(
                name=resolve_pack(model_name, model_root),
                root=str(Path(model_root).expanduser()),
                allowed_modules=modules,
                **kwargs,
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
        """The BGR array insightface works on and its ``Face`` objects (pixel boxes, keypoints, gender, age).

        Args:
            image: an RGB image.
        """
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
