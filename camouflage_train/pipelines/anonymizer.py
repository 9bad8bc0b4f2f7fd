"""The one interface every anonymizer has, and the two reference methods.

An anonymizer takes a batch of same-size RGB images, their persons (:class:`PersonBatch`: boxes and attributes,
as annotated), one seed per image and one prompt per image, and returns the anonymized images in order:

    anonymizer(images, persons, seeds, prompts) -> images
    anonymizer.to(device) -> anonymizer

``anonymize.py`` and ``evaluate.py`` only use this, so a new method is one class plus one config file with its
``_target_`` (see the README, "Adding an anonymizer"). :class:`Identity` (output = input, the re-identification
anchor) and :class:`Blur` (Gaussian blur of person regions) are the reference rows of every evaluation;
:class:`VaeReconstruction` (the base's VAE, encode + decode) is the ceiling of what any latent-diffusion output keeps;
CAMOUFLaGE-Base and -Light live in :mod:`~camouflage_train.pipelines.base` and
:mod:`~camouflage_train.pipelines.light`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from PIL import Image, ImageFilter

from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.models.ip_adapter import DEFAULT_REGION_EXPAND


class Anonymizer(Protocol):
    """What a row of the evaluation, and ``anonymize.py``, runs: images + their persons -> anonymized images."""

    def __call__(
        self, images: Sequence[Image.Image], persons: PersonBatch, seeds: Sequence[int], prompts: Sequence[str]
    ) -> list[Image.Image]:
        """Anonymize ``images``: image ``i`` with ``persons[i]``, ``seeds[i]`` and ``prompts[i]``.

        Args:
            images: RGB images of one size.
            persons: one row of persons per image.
            seeds: one seed per image.
            prompts: one prompt per image (empty: the anonymizer's own).
        """
        ...

    def to(self, device: torch.device | str) -> Anonymizer:
        """Move to ``device``; returns itself.

        Args:
            device: the target device.
        """
        ...


class Identity:
    """Output = input: re-identification near 100 %, FID near 0; the anchor of every table."""

    def __call__(
        self, images: Sequence[Image.Image], persons: PersonBatch, seeds: Sequence[int], prompts: Sequence[str]
    ) -> list[Image.Image]:
        return [image.copy() for image in images]

    def to(self, device: torch.device | str) -> Identity:
        """Nothing to move; returns itself.

        Args:
            device: ignored.
        """
        return self


class Blur:
    """Gaussian-blur each person's extent (its body under a schema with ``body``, else its face box) grown
    ``expand`` times, radius ``sigma`` x the extent's longer side.

    Args:
        expand: each extent grown this much around its centre.
        sigma: the blur radius, as a share of the box's longer side.
    """

    def __init__(self, expand: float = DEFAULT_REGION_EXPAND, sigma: float = 0.15) -> None:
        self.expand, self.sigma = expand, sigma

    def __call__(
        self, images: Sequence[Image.Image], persons: PersonBatch, seeds: Sequence[int], prompts: Sequence[str]
    ) -> list[Image.Image]:
        return [
            self._blur(image, boxes.tolist(), mask.tolist())
            for image, boxes, mask in zip(images, persons.region_boxes(), persons.mask, strict=True)
        ]

    def _blur(self, image: Image.Image, boxes: list[list[float]], mask: list[bool]) -> Image.Image:
        image = image.copy()
        width, height = image.size
        for (x0, y0, x1, y1), real in zip(boxes, mask, strict=True):
            if not real:
                continue
            cx, cy, hw, hh = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height, (x1 - x0) * width, (y1 - y0) * height
            region = (
                max(0, int(cx - hw * self.expand / 2)),
                max(0, int(cy - hh * self.expand / 2)),
                min(width, math.ceil(cx + hw * self.expand / 2)),
                min(height, math.ceil(cy + hh * self.expand / 2)),
            )
            if region[2] <= region[0] or region[3] <= region[1]:
                continue
            radius = max(1.0, self.sigma * max(hw, hh))
            image.paste(image.crop(region).filter(ImageFilter.GaussianBlur(radius)), region[:2])
        return image

    def to(self, device: torch.device | str) -> Blur:
        """Nothing to move; returns itself.

        Args:
            device: ignored.
        """
        return self


class VaeReconstruction:
    """Each image encoded (latent mean) and decoded by the base's VAE: every Base or Light output is at best such a
    reconstruction, so this row's re-identification is the most any generated row can show, and its FID the least.

    Args:
        backbone: the frozen base whose VAE is used.
    """

    def __init__(self, backbone: Mapping[str, Any]) -> None:
        """``backbone``: the base's ``load_frozen_backbone`` arguments (evaluate.yaml passes ``anonymizers.base``'s)."""
        from diffusers.image_processor import VaeImageProcessor

        from camouflage_train.models.backbone import load_frozen_backbone

        self.vae = load_frozen_backbone(**backbone, with_unet=False).vae
        self.processor = VaeImageProcessor(vae_scale_factor=2 ** (len(self.vae.config.block_out_channels) - 1))

    def __call__(
        self, images: Sequence[Image.Image], persons: PersonBatch, seeds: Sequence[int], prompts: Sequence[str]
    ) -> list[Image.Image]:
        return self.reconstruct(images)

    @torch.no_grad()
    def reconstruct(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """The round trip itself (the mini face pack trains its recogniser on it too).

        Args:
            images: RGB images of one size.
        """
        weight = next(self.vae.parameters())
        pixels = self.processor.preprocess(list(images)).to(weight.device, weight.dtype)
        decoded = self.vae.decode(self.vae.encode(pixels).latent_dist.mode()).sample
        return self.processor.postprocess(decoded.float(), output_type="pil")

    def to(self, device: torch.device | str) -> VaeReconstruction:
        """Move the VAE to ``device``; returns itself.

        Args:
            device: the target device.
        """
        self.vae.to(device)
        return self
