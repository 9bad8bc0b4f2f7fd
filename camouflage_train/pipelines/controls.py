"""Control-map preprocessors: RGB image -> the conditioning image a ControlNet expects.

Real annotators come from existing packages and load their weights on first use:
:class:`AuxProcessor` wraps ``controlnet_aux`` (depth_midas, normal_bae, openpose_full, lineart_realistic, ...;
the ``annotators`` extra), :class:`UperNetSegmentation` colours transformers' ADE20K UperNet output with
``controlnet_aux``'s ADE20K palette as the seg ControlNet was trained on. Both run on the GPU when there is one
(``device: auto``) and fetch their weights into ``cache_dir`` after checking the repository has them.
:class:`CannyEdges` and :class:`SobelLines` need no weights (tests, demo, quick runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from camouflage_train.utils.hub import Want, plan_files, weight_file
from camouflage_train.utils.optional import optional_import


class Preprocessor(Protocol):
    """Image -> the conditioning image of one ControlNet (edges, depth, pose, ...)."""

    def __call__(self, image: Image.Image) -> Image.Image: ...


class CannyEdges:
    """Canny edges as a 3-channel white-on-black image (the canny ControlNet's input).

    Args:
        low: Canny's lower hysteresis threshold.
        high: its upper threshold.
    """

    def __init__(self, low: int = 100, high: int = 200) -> None:
        self.low, self.high = low, high

    def __call__(self, image: Image.Image) -> Image.Image:
        cv2 = optional_import("cv2", "faces", "CannyEdges")
        edges = cv2.Canny(np.asarray(image.convert("L")), self.low, self.high)
        return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


class SobelLines:
    """Gradient magnitude, normalized, white lines on black: a weight-free stand-in for line art."""

    def __call__(self, image: Image.Image) -> Image.Image:
        cv2 = optional_import("cv2", "faces", "SobelLines")
        gray = np.asarray(image.convert("L"), dtype=np.float32)
        magnitude = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
        lines = (255 * magnitude / max(float(magnitude.max()), 1e-6)).astype(np.uint8)
        return Image.fromarray(np.repeat(lines[:, :, None], 3, axis=2))


def _import_controlnet_aux() -> Any:
    return optional_import(
        "controlnet_aux", "annotators", "real ControlNet annotators (or use the weight-free CannyEdges/SobelLines)"
    )


def resolve_device(device: str | None) -> str:
    """``auto`` (or ``None``): ``cuda`` when a GPU is visible, else ``cpu``; any other value as given.

    Args:
        device: ``auto``, ``None`` or a device name.
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


ANNOTATORS_REPO = "lllyasviel/Annotators"
# The files of lllyasviel/Annotators that controlnet_aux reads for each processor (docs/hub_repositories.yaml).
ANNOTATOR_FILES: dict[str, tuple[str, ...]] = {
    "depth_midas": ("dpt_hybrid-midas-501f0c75.pt",),
    "normal_bae": ("scannet.pt",),
    "openpose_full": ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
    "lineart_realistic": ("sk_model.pth", "sk_model2.pth"),
}


def annotator_weights(processor_id: str, cache_dir: str | None = None) -> Path | None:
    """The local folder holding ``processor_id``'s files of ``lllyasviel/Annotators`` (downloaded into ``cache_dir``
    if needed, after checking the repository has them); ``None`` for a processor not listed in ``ANNOTATOR_FILES``.

    Args:
        processor_id: a ``controlnet_aux`` processor id.
        cache_dir: the hub cache folder (``None``: ``HF_HOME``'s).
    """
    if processor_id not in ANNOTATOR_FILES:
        return None
    wants = [Want((name,)) for name in ANNOTATOR_FILES[processor_id]]
    what = f"{processor_id} annotator weights"
    return plan_files(ANNOTATORS_REPO, wants, cache_dir=cache_dir, what=what, config_key="preprocessor").fetch()


class AuxProcessor:
    """A ``controlnet_aux`` processor by id, on ``device`` (``auto``: the GPU when there is one).

    Args:
        processor_id: a ``controlnet_aux`` processor id (``depth_midas``, ``normal_bae``, ``openpose_full``, ...).
        device: where the annotator network runs (``auto``, ``cuda``, ``cuda:1``, ``cpu``).
        cache_dir: the hub cache for its weights from ``lllyasviel/Annotators`` (``None``: ``HF_HOME``'s).
    """

    def __init__(self, processor_id: str, device: str = "auto", cache_dir: str | None = None) -> None:
        self.processor_id, self.device, self.cache_dir = processor_id, device, cache_dir
        self._detector: Any = None
        self._params: dict[str, Any] = {}

    def load(self) -> Any:
        """Build the annotator (weights fetched on first use) and move it to the device."""
        if self._detector is None:
            _import_controlnet_aux()
            from controlnet_aux.processor import MODEL_PARAMS, MODELS, Processor

            folder = annotator_weights(self.processor_id, self.cache_dir)
            if folder is not None:
                self._detector = MODELS[self.processor_id]["class"].from_pretrained(str(folder))
            else:  # controlnet_aux fetches what it needs itself
                self._detector = Processor(self.processor_id).processor
            self._params = dict(MODEL_PARAMS[self.processor_id])
            if hasattr(self._detector, "to"):
                self._detector.to(resolve_device(self.device))
        return self._detector

    def __call__(self, image: Image.Image) -> Image.Image:
        out = self.load()(image, **self._params)
        return out.resize(image.size) if out.size != image.size else out


class UperNetSegmentation:
    """ADE20K semantic segmentation (transformers UperNet) in the colours of the seg ControlNet.

    Args:
        model: hub id or local folder of a ``UperNetForSemanticSegmentation`` with its image processor.
        device: where it runs (``auto``: the GPU when there is one).
        cache_dir: the hub cache folder (``None``: ``HF_HOME``'s).
    """

    def __init__(
        self, model: str = "openmmlab/upernet-convnext-small", device: str = "auto", cache_dir: str | None = None
    ) -> None:
        self.model_id, self.device, self.cache_dir = model, device, cache_dir
        self._model: Any = None

    def load(self) -> Any:
        """Load the processor and the model onto the device: config, preprocessor config and the weights in the
        format the repository has (``openmmlab/upernet-convnext-small`` has only ``pytorch_model.bin``)."""
        if self._model is None:
            from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

            folder = Path(self.model_id).expanduser()
            if not folder.is_dir():
                wants = [
                    Want(("config.json",)),
                    Want(("preprocessor_config.json",)),
                    weight_file("", "model", None, "pytorch_model"),
                ]
                folder = plan_files(
                    self.model_id, wants, cache_dir=self.cache_dir, what="UperNet segmentation", config_key="model"
                ).fetch()
            self._processor = AutoImageProcessor.from_pretrained(folder)
            self._model = UperNetForSemanticSegmentation.from_pretrained(folder).to(resolve_device(self.device)).eval()
        return self._model

    def __call__(self, image: Image.Image) -> Image.Image:
        import torch

        model = self.load()
        palette = np.asarray(_import_controlnet_aux().util.ade_palette(), dtype=np.uint8)
        inputs = self._processor(images=image, return_tensors="pt").to(model.device)
        with torch.no_grad():
            outputs = model(**inputs)
        labels = self._processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        return Image.fromarray(palette[labels.cpu().numpy()])
