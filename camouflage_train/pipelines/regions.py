"""Keep the real scene outside the persons: what Light and Base redraw is each person's region, nothing else.

A person's region is its extent (:meth:`~camouflage_train.models.conditioning.PersonBatch.region_masks`: the body
box under a schema with ``body``, else the face box) grown ``region_expand`` times. Inside it the person is drawn
from noise; outside it the real image's latents are put back after every step (:class:`KeepBackground`) and its
pixels after decoding (:func:`paste_outside`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

from camouflage_train.compat.diffusers_internals import execution_device
from camouflage_train.models.backbone import add_noise_fp32
from camouflage_train.models.conditioning import PersonBatch


class KeepBackground:
    """Keep the real scene outside the person regions: a ``callback_on_step_end`` for diffusers' pipelines.

    After every denoising step the latents outside the persons' regions are replaced by the real image's latents
    noised to the step's next timestep (the same noise throughout, from the image's seed), and after the last
    step by the real latents themselves, so the persons are drawn in the real scene's context. Inside the regions
    each person is drawn from noise, from its attributes only: nothing of the original face reaches them but what
    crosses the region's border through the network's receptive field (measured by re-identification). The VAE
    decoder mixes pixels across the border too, so :func:`paste_outside` then puts the original pixels back
    outside the regions. It costs one VAE encode per image, no extra UNet pass.

    Args:
        latents: the real images' latents (``[B, C, h, w]``, already scaled).
        regions: ``[B, 1, h, w]`` in ``[0, 1]``, 1 inside a person's region.
        noise: ``[B, C, h, w]`` noise for the outside (from the images' seeds).
    """

    def __init__(self, latents: torch.Tensor, regions: torch.Tensor, noise: torch.Tensor) -> None:
        self.latents, self.regions, self.noise = latents, regions, noise

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        timesteps = pipe.scheduler.timesteps
        current = tensors["latents"]
        if step + 1 < len(timesteps):
            following = timesteps[step + 1 : step + 2].to(self.latents.device)
            outside = add_noise_fp32(pipe.scheduler, self.latents, self.noise, following)
        else:
            outside = self.latents
        regions = self.regions.to(current.dtype)
        tensors["latents"] = regions * current + (1 - regions) * outside.to(current.dtype)
        return tensors


def background_keeper(
    pipe: Any,
    images: Sequence[Image.Image],
    persons: PersonBatch,
    seeds: Sequence[int],
    region_expand: float,
) -> KeepBackground:
    """:class:`KeepBackground` for ``images``: their VAE latents, the union of the persons' regions (every latent
    cell that an extent grown
    ``region_expand`` times) and per-image noise from ``seeds``.

    Args:
        pipe: the Light or Base pipeline (a diffusers Stable Diffusion pipeline).
        images: the real images.
        persons: their persons.
        seeds: one seed per image.
        region_expand: the person regions' growth.
    """
    device, dtype = execution_device(pipe), pipe.vae.dtype
    pixels = torch.stack([TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True) for image in images])
    pixels = (pixels * 2 - 1).to(device, dtype)
    latents = pipe.vae.encode(pixels).latent_dist.mean.float() * pipe.vae.config.scaling_factor
    size = tuple(latents.shape[-2:])
    regions = persons.to(device).region_masks(size, region_expand, cover=True)  # every cell a region touches
    generators = [torch.Generator(device="cpu").manual_seed(int(s) + 1) for s in seeds]
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
    return KeepBackground(latents, regions.amax(dim=1, keepdim=True), noise)


def paste_outside(
    originals: Sequence[Image.Image],
    generated: Sequence[Image.Image],
    persons: PersonBatch,
    region_expand: float,
    feather: float = 0.0,
) -> list[Image.Image]:
    """Each generated image inside its persons' regions (extents grown ``region_expand`` times), the original
    outside them, blended across the regions' borders when ``feather`` is above 0.

    Args:
        originals: the real images.
        generated: the pipeline's images.
        persons: their persons.
        region_expand: the person regions' growth.
        feather: the blend's width: the Gaussian blur radius of the region mask, as a share of the image's shorter
            side (0: a hard border).
    """
    width, height = originals[0].size
    regions = persons.to("cpu").region_masks((height, width), region_expand, cover=True)
    radius = feather * min(width, height)
    pasted = []
    for original, image, region in zip(originals, generated, regions.amax(dim=1), strict=True):
        inside = Image.fromarray((region.numpy() * 255).astype("uint8"), mode="L")
        if radius > 0:
            inside = inside.filter(ImageFilter.GaussianBlur(radius))
        pasted.append(Image.composite(image.convert("RGB").resize(original.size), original.convert("RGB"), inside))
    return pasted
