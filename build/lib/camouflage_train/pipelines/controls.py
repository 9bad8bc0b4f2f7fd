"""Control-map preprocessors: RGB image -> the conditioning image a ControlNet expects.

Real annotators come from existing packages and load their weights on first use:
:class:`AuxProcessor` wraps ``controlnet_aux`` (depth_midas, normal_bae, openpose_full, lineart_realistic, ...;
``pip install camouflage-train[annotators]``), :class:`UperNetSegmentation` colours transformers' ADE20K
UperNet output with ``controlnet_aux``'s ADE20K palette as the seg ControlNet was trained on.
:class:`CannyEdges` and :class:`SobelLines` need no weights (tests, demo, quick runs).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from PIL import Image

from camouflage_train.utils.optional import optional_import


class Preprocessor(Protocol):
    def __call__(self, image: Image.Image) -> Image.Image: ...


class CannyEdges:
    """Canny edges as a 3-channel white-on-black image (the canny ControlNet's input)."""

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


class AuxProcessor:
    """A ``controlnet_aux`` processor by id (weights from ``lllyasviel/Annotators`` on first use)."""

    def __init__(self, processor_id: str) -> None:
        self.processor_id = processor_id
        self._processor: Any = None

    def __call__(self, image: Image.Image) -> Image.Image:
        if self._processor is None:
            _import_controlnet_aux()
            from controlnet_aux.processor import Processor

            self._processor = Processor(self.processor_id)
        out = self._processor(image, to_pil=True)
        return out.resize(image.size) if out.size != image.size else out


class UperNetSegmentation:
    """ADE20K semantic segmentation (transformers UperNet) in the colours of the seg ControlNet."""

    def __init__(self, model: str = "openmmlab/upernet-convnext-small", device: str = "cpu") -> None:
        self.model_id, self.device = model, device
        self._model: Any = None

    def __call__(self, image: Image.Image) -> Image.Image:
        import torch
        from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

        if self._model is None:
            self._processor = AutoImageProcessor.from_pretrained(self.model_id)
            self._model = UperNetForSemanticSegmentation.from_pretrained(self.model_id).to(self.device).eval()
            self._palette = np.asarray(_import_controlnet_aux().util.ade_palette(), dtype=np.uint8)
        inputs = self._processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self._model(**inputs)
        labels = self._processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        return Image.fromarray(self._palette[labels.cpu().numpy()])
