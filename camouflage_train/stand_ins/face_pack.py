"""A tiny insightface model pack, exported from torch to ONNX in the real formats, for tests and demos.

insightface ships no weights and this project's machines cannot download ``buffalo_l``. These three small
models have the exact input/output signatures insightface routes on, so ``FaceAnalysis(name=<folder>)``
runs its real detection, alignment, attribute and recognition code on them:

* ``det_tiny.onnx``: SCRFD layout (9 outputs: scores, box distances and 5 keypoints at strides 8/16/32,
  2 anchors). Its only "knowledge" is a skin-colour rule, so it finds skin-coloured blobs (faces, hands)
  in real photos and nothing in flat images; boxes grow with the blob.
* ``genderage_tiny.onnx``: 96x96 crop -> [female, male, age/100], a fixed random conv net.
* ``w600k_tiny.onnx``: 112x112 aligned crop -> 512-d embedding, a fixed random conv net.

Outputs are deterministic, meaningless as face analysis, and exercise every line of the pipeline.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from camouflage_train.utils.atomic import atomic_folder

STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
# Keypoints of a frontal face relative to the box centre, in units of the box half-size.
_KPS = ((-0.45, -0.3), (0.45, -0.3), (0.0, 0.1), (-0.35, 0.5), (0.35, 0.5))


class SkinBlobDetector(nn.Module):
    """SCRFD-format outputs from a skin-colour rule; only stride 16 fires."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rgb = x * 128.0 + 127.5  # insightface feeds (pixel - 127.5) / 128, RGB order
        r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
        skin = torch.sigmoid((r - g - 15) / 4) * torch.sigmoid((r - b - 15) / 4) * torch.sigmoid((r - 95) / 4)
        skin = skin * torch.sigmoid((b - 0.45 * r) / 6)  # skin keeps some blue; orange walls and wood do not
        scores, boxes, kpss = [], [], []
        for stride in STRIDES:
            cells = F.avg_pool2d(skin, stride)
            blob = F.avg_pool2d(cells, 3, stride=1, padding=1, count_include_pad=False)
            around = F.avg_pool2d(cells, 9, stride=1, padding=4, count_include_pad=False)
            peak = (blob >= F.max_pool2d(blob, 5, stride=1, padding=2)).to(blob.dtype)
            active = 1.0 if stride == 16 else 0.0
            score = torch.sigmoid(12.0 * (blob - 0.5)) * torch.sigmoid(20.0 * (blob - around - 0.1)) * peak * active
            half = 0.8 + 1.6 * blob  # box half-size in cells
            flat = lambda t: t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])  # noqa: E731
            score, half = flat(score), flat(half)
            scores.append(score.repeat_interleave(NUM_ANCHORS, dim=1))
            boxes.append(half.repeat(1, 1, 4).repeat_interleave(NUM_ANCHORS, dim=1))
            kps = torch.cat([half * v for point in _KPS for v in point], dim=-1)
            kpss.append(kps.repeat_interleave(NUM_ANCHORS, dim=1))
        return (*scores, *boxes, *kpss)


class TinyConvHead(nn.Module):
    """A small fixed random conv net: image crop -> ``out_dim`` values (sigmoid on the last ``sigmoid_tail``).

    Args:
        out_dim: output values.
        sigmoid_tail: how many of the last outputs go through a sigmoid.
    """

    def __init__(self, out_dim: int, sigmoid_tail: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(16 * 16, out_dim)
        self.sigmoid_tail = sigmoid_tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        if self.sigmoid_tail:
            out = torch.cat([out[:, : -self.sigmoid_tail], torch.sigmoid(out[:, -self.sigmoid_tail :])], dim=1)
        return out


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, outputs: list[str], dynamic_hw: bool) -> None:
    """The ONNX layout insightface reads: input ``input.1``, opset 17, dynamic batch (and H/W for detectors).

    Args:
        model: the network.
        example: an example input.
        path: the ``.onnx`` file.
        outputs: the output names.
        dynamic_hw: dynamic height and width (detectors).
    """
    axes = {"input.1": {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            input_names=["input.1"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def build_tiny_face_pack(folder: str | Path, seed: int = 0) -> Path:
    """Write the three models into ``folder`` (atomically) unless they are there; return the folder.

    Args:
        folder: the pack's folder.
        seed: the random weights' seed.
    """
    folder = Path(folder)
    names = ("det_tiny.onnx", "genderage_tiny.onnx", "w600k_tiny.onnx")
    if all((folder / n).is_file() for n in names):
        return folder
    with atomic_folder(folder, replace=True) as staging:
        torch.manual_seed(seed)
        det_outputs = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
        export_onnx(SkinBlobDetector(), torch.zeros(1, 3, 640, 640), staging / names[0], det_outputs, dynamic_hw=True)
        export_onnx(TinyConvHead(3, sigmoid_tail=1), torch.zeros(1, 3, 96, 96), staging / names[1], ["fc1"], False)
        export_onnx(TinyConvHead(512), torch.zeros(1, 3, 112, 112), staging / names[2], ["embedding"], False)
    return folder


def tiny_face_pack(cache_dir: str | Path, file: str | None = None) -> str:
    """The tiny pack's folder under ``cache_dir`` (built on first use), or ``file`` inside it: the config
    factory behind ``faces=tiny`` and ``recognisers=tiny``, called where the pack is needed.

    Args:
        cache_dir: where the pack is built.
        file: a file of the pack (``None``: the folder).
    """
    folder = build_tiny_face_pack(Path(cache_dir) / "faces-tiny-v1")
    return str(folder / file if file else folder)
