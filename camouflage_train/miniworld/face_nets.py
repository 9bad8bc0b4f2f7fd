"""The mini face pack's networks, in the input/output formats insightface routes on (see ``face_pack.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DET_STRIDE = 8  # the only stride that fires; 16 and 32 give zero scores (faces here are 10-25 px)
SCRFD_STRIDES = (8, 16, 32)
NUM_ANCHORS = 2


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class GridDetector(nn.Module):
    """SCRFD-format detector: per stride-8 anchor point a face score, box distances and five keypoints.

    Input: insightface's normalised RGB ``(pixel - 127.5) / 128``, any size divisible by 32. Outputs, as SCRFD
    (scores, boxes, keypoints for strides 8, 16, 32; rows = cells x 2 anchors): distances in stride units.

    Args:
        width: channels of the first convolution.
    """

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            _block(3, 16, 1), _block(16, 24, 2), _block(24, 32, 2), _block(32, width, 2),
            _block(width, width, 1), _block(width, width, 1),
        )  # fmt: skip
        self.head = nn.Conv2d(width, 1 + 4 + 10, 1)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 15, H/8, W/8]``: score logit, 4 box distances, 10 keypoint offsets.

        Args:
            x: normalised images ``[B, 3, H, W]``.
        """
        return self.head(self.trunk(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.raw(x)
        rows = lambda t: t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]).repeat_interleave(NUM_ANCHORS, 1)  # noqa: E731
        scores, boxes, kpss = [rows(torch.sigmoid(out[:, :1]))], [rows(out[:, 1:5])], [rows(out[:, 5:])]
        for stride in SCRFD_STRIDES[1:]:
            empty = F.avg_pool2d(x[:, :1], stride) * 0.0
            scores.append(rows(empty))
            boxes.append(rows(empty.repeat(1, 4, 1, 1)))
            kpss.append(rows(empty.repeat(1, 10, 1, 1)))
        return (*scores, *boxes, *kpss)


class CropNet(nn.Module):
    """Aligned face crop -> ``out_dim`` values (gender logits + age/100, or an identity embedding).

    Args:
        out_dim: output values.
        input_size: the crop's side in pixels (96 for gender/age, 112 for recognition).
        width: channels of the first convolution.
    """

    def __init__(self, out_dim: int, input_size: int, width: int = 64) -> None:
        super().__init__()
        grid = -(-input_size // 32)  # ONNX pools only by whole factors
        # Crops are upsampled from faces of 10-25 px: averaging 4x4 first loses nothing and saves 16x compute.
        self.trunk = nn.Sequential(
            nn.AvgPool2d(4), _block(3, 32, 1), _block(32, 48, 2), _block(48, width, 2), _block(width, width, 2),
            nn.AdaptiveAvgPool2d(grid), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(width * grid * grid, 128), nn.ReLU(), nn.Linear(128, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))
