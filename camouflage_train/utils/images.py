"""Image helpers shared by validation, evaluation and reports: sample grids and their column labels."""

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
    grid = with_column_labels(grid, ["real", "generated"], real.shape[-1] + 2, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def with_column_labels(picture: Image.Image, labels: list[str], step: int, padding: int) -> Image.Image:
    """``picture`` (a grid of columns ``step`` pixels apart after ``padding``) under a white strip naming each
    column, wrapped to the column's width.

    Args:
        picture: the grid.
        labels: one name per column, left to right.
        step: the distance between columns in pixels (tile + padding).
        padding: the grid's padding before the first column.
    """
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    _, top, _, bottom = font.getbbox("Mg")
    line_height = bottom - top + 2

    def wrap(label: str) -> list[str]:  # greedy, by rendered width, breaking anywhere
        lines = [""]
        for char in label:
            if lines[-1] and font.getlength(lines[-1] + char) > step - padding:
                lines.append("")
            lines[-1] += char
        return lines

    wrapped = [wrap(label) for label in labels]
    header = line_height * max(len(lines) for lines in wrapped) + padding
    labelled = Image.new("RGB", (picture.width, picture.height + header), "white")
    labelled.paste(picture, (0, header))
    draw = ImageDraw.Draw(labelled)
    for column, lines in enumerate(wrapped):
        for number, line in enumerate(lines):
            draw.text((padding + column * step, padding + number * line_height), line, fill="black", font=font)
    return labelled
