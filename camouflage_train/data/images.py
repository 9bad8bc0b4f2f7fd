"""Decode any image a dataset may hold into 8-bit RGB, or say precisely why it cannot be used.

Handled: EXIF orientation, grayscale, CMYK, palette and RGBA/LA (composited on white), 16-bit and float
images (rescaled to 8 bits). Refused with a :class:`BadSampleError` reason: empty or unreadable files,
truncated data, images over Pillow's decompression-bomb limit, images smaller than ``min_size``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class BadSampleError(Exception):
    """A sample that cannot be used; ``reason`` is a short stable label for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        if image.mode in ("I", "F") and array.max() <= 255 and array.min() >= 0:
            top = 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(source: Any, min_size: int = 1) -> Image.Image:
    """Open a path or take a PIL image; return an upright, fully decoded RGB image.

    Args:
        source: a path, an encoded file's bytes or a PIL image.
        min_size: refuse images whose shorter side is smaller (:class:`BadSampleError`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                image = source
            elif isinstance(source, (bytes, bytearray, memoryview)):  # an encoded file held in memory (shards)
                if len(source) == 0:
                    raise BadSampleError("empty file", "0 bytes")
                image = Image.open(io.BytesIO(source))
            else:
                path = Path(source)
                if not path.is_file():
                    raise BadSampleError("missing file", str(path))
                if path.stat().st_size == 0:
                    raise BadSampleError("empty file", str(path))
                image = Image.open(path)
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
    except BadSampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSampleError("too many pixels", str(err)) from err
    except UnidentifiedImageError as err:
        raise BadSampleError("not an image", str(err)) from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise BadSampleError("corrupt image", str(err)) from err
    if min(image.size) < min_size:
        raise BadSampleError("too small", f"{image.size[0]}x{image.size[1]} < {min_size}px")
    return image


def pixels_to_image(pixels: torch.Tensor) -> Image.Image:
    """A ``[3, H, W]`` tensor in ``[-1, 1]`` (what the datasets serve) back to an 8-bit RGB image.

    Rounds to the nearest level, so the 8-bit image a dataset read comes back exactly (torchvision's
    ``to_pil_image`` truncates floats: dozens of the 256 levels would come back one lower).

    Args:
        pixels: the image, channels first, in ``[-1, 1]``.
    """
    levels = ((pixels.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(levels.permute(1, 2, 0).numpy())
