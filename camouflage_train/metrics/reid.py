"""Re-identification of anonymized faces against the gallery of all original faces.

Faces are detected in the original and the anonymized image and matched by box overlap (Hungarian
assignment on IoU); each matched pair contributes the recogniser's embedding of both faces. Reported, per
recogniser: rank-1 identification rate (the anonymized face's nearest original in the whole gallery is its
own original), verification rate at a cosine threshold, mean identity cosine similarity, the face detection
rate on outputs (matched / original faces) and N. States are concatenated/summed across processes, so a
multi-GPU run gives the one-process result.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes ``[N, 4]`` x ``[M, 4]``.

    Args:
        a: ``[N, 4]`` boxes.
        b: ``[M, 4]`` boxes.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def requested_box_iou(requested: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """For each requested box ``[R, 4]``, its IoU with the detected face ``[D, 4]`` it is assigned to (Hungarian
    on IoU); 0 for a request no face was assigned to (fewer faces than requests, or no overlap).

    Args:
        requested: the boxes the persons were asked for ``[R, 4]``.
        detected: the faces found ``[D, 4]``.
    """
    out = np.zeros(len(requested))
    iou = box_iou(requested, detected)
    if iou.size:
        rows, cols = linear_sum_assignment(-iou)
        out[rows] = iou[rows, cols]
    return out


def match_faces(original: np.ndarray, anonymized: np.ndarray, min_iou: float = 0.3) -> list[tuple[int, int]]:
    """Pairs (original index, anonymized index) maximising total IoU, each with IoU >= ``min_iou``.

    Args:
        original: the original image's face boxes ``[N, 4]``.
        anonymized: the anonymized image's face boxes ``[M, 4]``.
        min_iou: the smallest IoU of a pair.
    """
    iou = box_iou(original, anonymized)
    if iou.size == 0:
        return []
    rows, cols = linear_sum_assignment(-iou)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou]


class ReIdentification(Metric):
    """Accumulate matched embedding pairs (and face counts); see the module docstring for the outputs.

    Args:
        threshold: the recogniser's cosine similarity above which a pair counts as re-identified.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("original", default=[], dist_reduce_fx="cat")
        self.add_state("anonymized", default=[], dist_reduce_fx="cat")
        self.add_state("gallery_extra", default=[], dist_reduce_fx="cat")
        self.add_state("faces", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, original: torch.Tensor, anonymized: torch.Tensor, unmatched_original: torch.Tensor) -> None:
        """``original``/``anonymized``: embeddings ``[K, D]`` of K matched pairs; ``unmatched_original``:
        embeddings of original faces without a match (they stay in the gallery)."""
        # Empty [0, D] batches are kept too (D > 1: an embedding width is known): a process whose images gave no
        # face must still hold [*, D] states, or gathering them across processes fails (an empty list is gathered
        # as a 1-D tensor).
        for state, values in ((self.original, original), (self.anonymized, anonymized)):
            if values.shape[0] or (values.ndim == 2 and values.shape[1] > 1):
                state.append(F.normalize(values.float(), dim=-1))
        if unmatched_original.shape[0] or (unmatched_original.ndim == 2 and unmatched_original.shape[1] > 1):
            self.gallery_extra.append(F.normalize(unmatched_original.float(), dim=-1))
        self.faces += original.shape[0] + unmatched_original.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        n = sum(t.shape[0] for t in self.original) if isinstance(self.original, list) else self.original.shape[0]
        if n == 0:
            nan = torch.tensor(float("nan"))
            return {
                "rank1": nan,
                "verification": nan,
                "cosine": nan,
                "detection_rate": torch.tensor(0.0),
                "n": torch.tensor(0),
            }
        original, anonymized = dim_zero_cat(self.original), dim_zero_cat(self.anonymized)
        extra = self.gallery_extra
        has_extra = (len(extra) > 0) if isinstance(extra, list) else extra.numel() > 0
        gallery = torch.cat([original, dim_zero_cat(extra)]) if has_extra else original
        similarity = anonymized @ gallery.T  # own original at column i
        own = similarity[torch.arange(n), torch.arange(n)]
        return {
            "rank1": (similarity.argmax(dim=1) == torch.arange(n, device=similarity.device)).float().mean(),
            "verification": (own >= self.threshold).float().mean(),
            "cosine": own.mean(),
            "detection_rate": torch.tensor(n / max(int(self.faces), 1)),
            "n": torch.tensor(n),
        }
