"""Feature extractors for FID/KID besides torchmetrics' Inception (whose weights must be downloaded)."""

from __future__ import annotations

import torch
from torch import nn


class RandomConvFeatures(nn.Module):
    """A fixed random conv net (seeded): uint8 images -> ``num_features`` features. For offline demos and
    tests only: its FID is a consistent distance between image sets, not comparable with Inception FID.

    Args:
        num_features: output features.
        seed: the random weights' seed.
    """

    def __init__(self, num_features: int = 64, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.num_features = num_features
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, num_features),
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return self.net(x)
