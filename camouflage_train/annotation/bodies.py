"""Body boxes: a COCO person detector (transformers object detection) and the matching of bodies to faces.

A person record is a face (:mod:`.faces`): identity and attributes live there. A body box adds the person's whole
extent as the record's optional ``body`` field. :class:`BodyDetector` finds the boxes labelled ``person`` in an
image; :func:`match_bodies` gives each face at most one of them, and one body to at most one face. A body no face
claims is not a person of the record list (there is no face to describe); annotation counts it
(``bodies_without_face``).

The detector is any transformers ``AutoModelForObjectDetection`` with its image processor and a ``person`` label
in its ``id2label`` (the COCO detectors of the hub), from a hub id or a local folder. The default repository is
``hustvl/yolos-tiny`` (YOLOS, a plain ViT trained on COCO; Apache-2.0; ``config.json``,
``preprocessor_config.json``, ``model.safetensors`` and ``pytorch_model.bin`` on its main branch, recorded in
``docs/hub_repositories.yaml``), chosen over ``facebook/detr-resnet-50`` (Apache-2.0 too, and more accurate by
its model card): DETR's main branch builds its ResNet backbone through timm, and transformers 4.x, which this
project still accepts, then downloads timm's ImageNet backbone weights while building the model, a second
repository that no file check sees and that fails offline; its ``no_timm`` branch avoids that, but its file list
could not be read here. YOLOS has no backbone of another library, is small (a fast download, quick on a CPU), and
persons whose face is found are mostly large in the picture, where a small detector does well. Another COCO
detector is a config change (``bodies.model``, ``bodies.revision``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from camouflage_train.data.schema import BODY_KEY, BOX_KEY
from camouflage_train.utils.config_checks import ConfigError
from camouflage_train.utils.hub import HubError, HubPlan, Want, check_folder, plan_files, weight_file

log = logging.getLogger(__name__)

DEFAULT_REPOSITORY = "hustvl/yolos-tiny"
PERSON_LABEL = "person"
# What the detector's loader reads: the model config (with id2label), the image processor's config, the weights.
DETECTOR_FILES = (
    Want(("config.json",)),
    Want(("preprocessor_config.json",)),
    weight_file("", "model", None, "pytorch_model"),
)


class BodyDetectorUnavailableError(HubError):
    """The person detector cannot be used: its folder or repository is missing, lacks a file, or has no ``person``
    label."""


class BodyMatch(NamedTuple):
    """What :func:`match_bodies` returns.

    Args:
        persons: the face records in their order; those given a body carry it as ``body``.
        unmatched: the body boxes no face was given.
    """

    persons: list[dict[str, Any]]
    unmatched: list[list[float]]


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") != 1 or "\\" in model


class BodyDetector:
    """Person boxes of an image from a COCO object detector (transformers ``AutoModelForObjectDetection``).

    The repository's file list (or the local folder) is checked when the detector is made, before anything is
    downloaded or loaded; :meth:`load` (called by the first detection) fetches only the files the loader reads.

    Args:
        model: a hub id or a local folder of an object-detection model with its image processor (``save_pretrained``
            of both, or ``hf download <repo> --local-dir <folder>``).
        revision: the hub revision (branch, tag or commit; ``None``: the default branch).
        score_threshold: person boxes scoring above this are kept.
        min_face_inside: matching (:func:`match_bodies`): the least share of a face box inside its body box.
        max_face_depth: matching: how far below the body's top its face's centre may be, in body heights.
        device: where the model runs (``auto``: the GPU when there is one).
        cache_dir: the hub cache folder (``None``: ``HF_HOME``'s).
        config_key: the config key that names the model, for messages.
    """

    def __init__(
        self,
        model: str = DEFAULT_REPOSITORY,
        revision: str | None = None,
        score_threshold: float = 0.7,
        min_face_inside: float = 0.8,
        max_face_depth: float = 0.6,
        device: str = "auto",
        cache_dir: str | None = None,
        config_key: str = "bodies.model",
    ) -> None:
        group = config_key.rpartition(".")[0] or "bodies"
        for name, value, low, high in (
            ("score_threshold", score_threshold, 0.0, 1.0),
            ("min_face_inside", min_face_inside, 0.0, 1.0),
            ("max_face_depth", max_face_depth, 0.0, 1.0),
        ):
            if not low <= float(value) <= high:
                raise ConfigError(f"{group}.{name} must be between {low:g} and {high:g}, got {value}")
        self.model_id, self.revision, self.score_threshold = str(model), revision, float(score_threshold)
        self.min_face_inside, self.max_face_depth = float(min_face_inside), float(max_face_depth)
        self.device, self.cache_dir, self.config_key = device, cache_dir, config_key
        self.source: Path | HubPlan = self._check_source()
        self._model: Any = None
        self._processor: Any = None
        self.person_labels: list[int] = []

    def _check_source(self) -> Path | HubPlan:
        """The local folder (its files checked) or the hub plan (the repository's file list checked)."""
        folder = Path(self.model_id).expanduser()
        what = "person detector"
        if folder.is_dir():
            check_folder(
                folder, DETECTOR_FILES, what=what, config_key=self.config_key, error=BodyDetectorUnavailableError
            )
            return folder
        if _looks_like_path(self.model_id):
            raise BodyDetectorUnavailableError(
                f"{self.config_key}: person detector folder not found: {folder}; pass an existing folder or a hub "
                f"id such as {DEFAULT_REPOSITORY}"
            )
        try:
            return plan_files(
                self.model_id,
                DETECTOR_FILES,
                revision=self.revision,
                cache_dir=self.cache_dir,
                what=what,
                config_key=self.config_key,
                error=BodyDetectorUnavailableError,
            )
        except HubError as err:  # the same error, with the way out that needs no detector
            raise type(err)(f"{err} Or annotate faces only: bodies=none.") from err

    def load(self) -> Any:
        """Fetch the checked files (hub) and load the image processor and the model onto the device; the model's
        ``id2label`` must name a ``person`` class."""
        if self._model is None:
            import torch
            from transformers import AutoImageProcessor, AutoModelForObjectDetection

            folder = self.source if isinstance(self.source, Path) else self.source.fetch()
            self.person_labels = person_labels(folder / "config.json", self.model_id, self.config_key)
            device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device in (None, "auto") else self.device
            self._processor = AutoImageProcessor.from_pretrained(folder)
            self._model = AutoModelForObjectDetection.from_pretrained(folder).to(device).eval()
        return self._model

    def __call__(self, image: Image.Image) -> list[list[float]]:
        """The person boxes of an RGB image, normalized ``[x0, y0, x1, y1]``, highest score first.

        Args:
            image: the image.
        """
        import torch

        model = self.load()
        width, height = image.size
        inputs = self._processor(images=image.convert("RGB"), return_tensors="pt").to(model.device)
        with torch.inference_mode():
            outputs = model(**inputs)
        found = self._processor.post_process_object_detection(
            outputs, threshold=self.score_threshold, target_sizes=[(height, width)]
        )[0]
        scored = []
        for score, label, box in zip(
            found["scores"].tolist(), found["labels"].tolist(), found["boxes"].tolist(), strict=True
        ):
            if int(label) not in self.person_labels:
                continue
            x0, y0, x1, y1 = box
            unit = [
                min(max(x0 / width, 0.0), 1.0),
                min(max(y0 / height, 0.0), 1.0),
                min(max(x1 / width, 0.0), 1.0),
                min(max(y1 / height, 0.0), 1.0),
            ]
            if unit[0] < unit[2] and unit[1] < unit[3]:
                scored.append((score, [round(v, 5) for v in unit]))
        scored.sort(key=lambda item: item[0], reverse=True)
        return [box for _, box in scored]

    def match(self, faces: Sequence[Mapping[str, Any]], image: Image.Image) -> BodyMatch:
        """Detect the bodies of ``image`` and match them to its face records (:func:`match_bodies`, this
        detector's matching settings).

        Args:
            faces: the image's face records.
            image: the image.
        """
        return match_bodies(faces, self(image), self.min_face_inside, self.max_face_depth)


def person_labels(config_file: Path, model: str, config_key: str = "bodies.model") -> list[int]:
    """The class ids a detector's ``config.json`` labels ``person``, looked up by name (label sets number their
    classes differently).

    Args:
        config_file: the model's ``config.json``.
        model: the model's name, for messages.
        config_key: the config key that names the model, for messages.
    """
    id2label = json.loads(Path(config_file).read_text()).get("id2label") or {}
    found = [int(i) for i, label in id2label.items() if str(label).strip().lower() == PERSON_LABEL]
    if not found:
        names = list(id2label.values())
        raise BodyDetectorUnavailableError(
            f"person detector '{model}' has no '{PERSON_LABEL}' class (its id2label: {names[:12]}"
            f"{' ...' if len(names) > 12 else ''}); choose a COCO-trained detector as {config_key} (e.g. "
            f"{DEFAULT_REPOSITORY})"
        )
    return found


def _box(values: Sequence[float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1


def match_bodies(
    faces: Sequence[Mapping[str, Any]],
    bodies: Sequence[Sequence[float]],
    min_face_inside: float = 0.8,
    max_face_depth: float = 0.6,
) -> BodyMatch:
    """Give each face record at most one body box, and each body to at most one face.

    A body may go to a face when at least ``min_face_inside`` of the face box's area lies inside the body box and
    the face's centre sits in the body's upper part: at most ``max_face_depth`` of the body's height below its top.
    Among the pairs that may match, the assignment (scipy's ``linear_sum_assignment``) matches as many faces as
    it can, then takes the highest total score, a pair's score being the face's share inside the body minus the
    horizontal offset of the face's centre from the body's centre in body widths (a face prefers the body it is
    centred in). The body written is the union of the detected body box and the face box (a body contains its
    face), normalized like ``box``. Faces without a body are returned as given, without ``body``.

    Args:
        faces: the face records (each with a normalized ``box``).
        bodies: normalized body boxes ``[x0, y0, x1, y1]``.
        min_face_inside: the least share of the face box's area inside the body box.
        max_face_depth: how far below the body's top the face's centre may be, in body heights.
    """
    persons = [dict(face) for face in faces]
    boxes = [list(_box(body)) for body in bodies]
    if not persons or not boxes:
        return BodyMatch(persons, boxes)
    from scipy.optimize import linear_sum_assignment

    gain = np.zeros((len(persons), len(boxes)))
    for i, face in enumerate(persons):
        fx0, fy0, fx1, fy1 = _box(face[BOX_KEY])
        face_area = max((fx1 - fx0) * (fy1 - fy0), 1e-12)
        cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
        for j, (bx0, by0, bx1, by1) in enumerate(boxes):
            inside = max(0.0, min(fx1, bx1) - max(fx0, bx0)) * max(0.0, min(fy1, by1) - max(fy0, by0)) / face_area
            depth = (cy - by0) / max(by1 - by0, 1e-12)
            if inside >= min_face_inside and depth <= max_face_depth:
                offset = abs(cx - (bx0 + bx1) / 2) / max(bx1 - bx0, 1e-12)
                # Each match's score (inside - offset) lies in (-1, 1]; a bonus above twice the number of faces makes
                # one more match outweigh any sum of scores, so linear_sum_assignment matches as many faces as it can
                # first, and among those assignments takes the best total score.
                gain[i, j] = 2.0 * (len(persons) + 1) + inside - offset
    rows, cols = linear_sum_assignment(gain, maximize=True)
    taken = set()
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        if gain[i, j] <= 0.0:
            continue
        fx0, fy0, fx1, fy1 = _box(persons[i][BOX_KEY])
        bx0, by0, bx1, by1 = (round(min(max(v, 0.0), 1.0), 5) for v in boxes[j])
        persons[i][BODY_KEY] = [min(bx0, fx0), min(by0, fy0), max(bx1, fx1), max(by1, fy1)]
        taken.add(j)
    return BodyMatch(persons, [box for j, box in enumerate(boxes) if j not in taken])
