"""Image helpers shared by validation and (later) evaluation."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid


def save_sample_grid(real: torch.Tensor, generated: list[Image.Image], path: Path) -> Image.Image:
    """Save one row per sample, real image (``[-1, 1]`` tensor) left and generated right; return the grid.

    Args:
        real: the real images ``[N, 3, H, W]`` in ``[-1, 1]``.
        generated: the generated images.
        path: the PNG to write (folders are made).
    """
    fake = torch.stack([TF.to_dtype(TF.to_image(img), torch.float32, scale=True) for img in generated])
    real01 = (real.detach().float().cpu().clamp(-1, 1) + 1) / 2
    pairs = torch.stack([real01, fake], dim=1).flatten(0, 1)
    grid = TF.to_pil_image(make_grid(pairs, nrow=2, padding=2, pad_value=1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid
