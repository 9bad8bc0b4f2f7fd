"""Generate images with the Light adapter through the stock diffusers ``StableDiffusionPipeline``.

The person embeddings go in as ``ip_adapter_image_embeds`` and the person regions as
``cross_attention_kwargs={"ip_adapter_masks": [masks]}``: nothing here is a custom sampler, so what
validation shows is what a downstream diffusers user gets. Under classifier-free guidance the negative
half has no persons at all (all-zero masks), i.e. it is the frozen SD model, as in training's
attribute dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from camouflage_train.models.attribute_encoder import AttributeEncoder
from camouflage_train.models.ip_adapter import AdapterConfig, person_region_masks


@dataclass(frozen=True)
class PersonBatch:
    """Padded person arrays for a batch, as produced by the data pipeline."""

    boxes: torch.Tensor  # [B, P, 4]
    continuous: torch.Tensor  # [B, P, C]
    categorical: torch.Tensor  # [B, P, K]
    mask: torch.Tensor  # [B, P] bool

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> PersonBatch:
        return cls(batch["boxes"], batch["continuous"], batch["categorical"], batch["person_mask"])


def adapter_inputs(
    encoder: AttributeEncoder, config: AdapterConfig, persons: PersonBatch, latent_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Person embeddings ``[B, P, E]`` and region masks ``[B, P, h, w]`` at latent resolution."""
    embeds = encoder(persons.boxes, persons.continuous, persons.categorical)
    expand = config.region_expand if config.region_masks else None
    masks = person_region_masks(persons.boxes, persons.mask, latent_size, expand)
    return embeds, masks


def build_pipeline(
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: object,
    unet: torch.nn.Module,
    scheduler_config: dict,
) -> StableDiffusionPipeline:
    """A stock SD pipeline around already-loaded modules (no copies, no safety checker)."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_light(
    pipe: StableDiffusionPipeline,
    encoder: AttributeEncoder,
    config: AdapterConfig,
    persons: PersonBatch,
    prompts: list[str],
    height: int,
    width: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses seed ``seed + i`` whatever the batch size."""
    scale = pipe.vae_scale_factor
    embeds, masks = adapter_inputs(encoder, config, persons, (height // scale, width // scale))
    if guidance_scale > 1.0:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
        masks = torch.cat([torch.zeros_like(masks), masks])
    device = pipe._execution_device
    generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        prompt=prompts,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
        ip_adapter_image_embeds=[embeds],
        cross_attention_kwargs={"ip_adapter_masks": [masks]},
        output_type="pil",
    ).images
