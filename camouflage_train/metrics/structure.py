"""Structure kept by an anonymizer: agreement of the edge maps of input and output, and SSIM.

Base promises to keep the scene (layout, pose, outlines) while replacing identity; these numbers are its utility
axis next to FID. Edges are Canny's (the canny ControlNet's own input), grown by one pixel on both sides so
that a one-pixel shift is not a miss.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from camouflage_train.pipelines.controls import CannyEdges
from camouflage_train.utils.optional import optional_import


def edge_iou(original: Image.Image, output: Image.Image, edges: CannyEdges | None = None) -> float:
    """IoU of the (1-pixel dilated) edge maps; 1.0 when neither image has an edge.

    Args:
        original: the original image.
        output: the anonymized image.
        edges: the edge detector (default Canny with the project's thresholds).
    """
    cv2 = optional_import("cv2", "faces", "edge_iou")
    edges = edges or CannyEdges()
    kernel = np.ones((3, 3), np.uint8)
    a, b = (cv2.dilate(np.asarray(edges(image))[:, :, 0], kernel) > 0 for image in (original, output))
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
