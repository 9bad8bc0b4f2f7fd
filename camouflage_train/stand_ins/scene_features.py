"""A feature extractor for FID/KID trained in the miniature world (``miniworld/weights/features``).

Inception features mean little on 64x64 synthetic scenes and need a download; this small conv net is trained to
read what the scenes are made of (how many people, where the faces are, the background colours), so distances
between image sets measure the world's content rather than a random projection of pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class SceneFeatures(nn.Module):
    """uint8 (or [0, 1] float) images ``[B, 3, H, W]`` -> ``num_features`` pooled features, or (``embedding``) an
    embedding of the 4x4 grid of cells, which keeps where each feature is (hair above, clothes below).

    Args:
        num_features: channels of the last convolution (the output when ``embedding`` is 0).
        width: channels of the second convolution.
        embedding: the width of a linear embedding of the 4x4 cell grid (0: mean-pooled cells instead).
    """

    def __init__(self, num_features: int = 64, width: int = 48, embedding: int = 0) -> None:
        super().__init__()
        self.num_features, self.width, self.embedding = num_features, width, embedding
        block = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(8, cout), nn.SiLU())  # noqa: E731
        self.net = nn.Sequential(block(3, 32), block(32, width), block(width, num_features))  # 64 -> 8x8 cells
        if embedding:
            self.cells = nn.AdaptiveAvgPool2d(4)
            self.project = nn.Linear(num_features * 16, embedding)
        self.requires_grad_(False).eval()

    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """Features per 8x8 cell ``[B, num_features, H/8, W/8]`` (what training reads faces from).

        Args:
            images: uint8 (or ``[0, 1]`` float) images ``[B, 3, H, W]``.
        """
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return self.net(x * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.embedding:
            return self.project(self.cells(self.grid(images)).flatten(1))
        return self.grid(images).mean(dim=(2, 3))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> SceneFeatures:
        """Load weights and config written by :meth:`save_pretrained`.

        Args:
            folder: the folder.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        model = cls(**config)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.requires_grad_(False).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and the weights (safetensors) into ``folder``.

        Args:
            folder: the folder.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"num_features": self.num_features, "width": self.width}
        if self.embedding:
            config["embedding"] = self.embedding
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
