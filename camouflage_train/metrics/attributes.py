"""Attribute preservation between matched original and anonymized faces: age MAE, gender agreement, and
head-pose (yaw/pitch/roll from the five keypoints) mean absolute error; and box agreement, the mean IoU between
each requested person box and the face detected for it in the output (0 when none is)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class AttributePreservation(Metric):
    """Age error, gender agreement and head-pose error between matched original and anonymized faces (keyword arguments:
    torchmetrics ``Metric`` options)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("age_abs", "gender_same", "pose_abs", "pairs"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, age: torch.Tensor, gender: torch.Tensor, pose: torch.Tensor) -> None:
        """Each ``[K, 2, ...]``: original then anonymized value of K matched pairs; ``pose`` is ``[K, 2, 3]``."""
        self.age_abs += (age[:, 0] - age[:, 1]).abs().sum().double()
        self.gender_same += (gender[:, 0] == gender[:, 1]).sum().double()
        self.pose_abs += (pose[:, 0] - pose[:, 1]).abs().mean(-1).sum().double()
        self.pairs += age.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        pairs = self.pairs.clamp(min=1)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        if self.pairs == 0:
            return {"age_mae": nan, "gender_agreement": nan, "pose_mae": nan}
        return {
            "age_mae": self.age_abs / pairs,
            "gender_agreement": self.gender_same / pairs,
            "pose_mae": self.pose_abs / pairs,
        }


class BoxAgreement(Metric):
    """Mean IoU of requested boxes with their assigned output faces
    (:func:`~camouflage_train.metrics.reid.requested_box_iou`); a request without a face counts 0, so a method
    that draws fewer people than asked is not rewarded."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("requests", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ious: torch.Tensor) -> None:
        """``ious``: one value per requested box."""
        self.iou_sum += ious.double().sum()
        self.requests += ious.numel()

    def compute(self) -> torch.Tensor:
        if self.requests == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.iou_sum / self.requests
