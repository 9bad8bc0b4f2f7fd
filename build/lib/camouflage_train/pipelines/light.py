"""CAMOUFLaGE-Light inference: the attribute adapter through stock diffusers pipelines.

The person embeddings go in as ``ip_adapter_image_embeds`` and the person regions as
``cross_attention_kwargs={"ip_adapter_masks": [masks]}``: nothing here is a custom sampler, so what
validation shows is what a downstream diffusers user gets. Under classifier-free guidance the negative
half has no persons at all (all-zero masks), i.e. it is the frozen SD model, as in training's
attribute dropout.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from camouflage_train.models.attribute_encoder import AttributeEncoder
from camouflage_train.models.backbone import FrozenBackbone
from camouflage_train.models.ip_adapter import AdapterConfig, adapter_modules, person_region_masks
from camouflage_train.pipelines.base import control_kwargs, stock_controlnet_pipeline


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
    seeds: Sequence[int] | None = None,
    negative_prompt: str | None = None,
    output_type: str = "pil",
    **pipe_kwargs: Any,
) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses ``seeds[i]`` (default ``seed + i``) whatever the batch.

    ``pipe`` may be a stock SD or ControlNet pipeline; ``pipe_kwargs`` go to it (control images, scales).
    """
    scale = pipe.vae_scale_factor
    embeds, masks = adapter_inputs(encoder, config, persons, (height // scale, width // scale))
    if guidance_scale > 1.0:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
        masks = torch.cat([torch.zeros_like(masks), masks])
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    device = pipe._execution_device
    return pipe(
        prompt=prompts,
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt is not None else None,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator(device=device).manual_seed(int(s)) for s in seeds],
        # In the projection's dtype: fp32 for a trained adapter on a bf16 UNet (no autocast needed).
        ip_adapter_image_embeds=[embeds.to(next(pipe.unet.encoder_hid_proj.parameters()).dtype)],
        cross_attention_kwargs={"ip_adapter_masks": [masks]},
        output_type=output_type,
        **pipe_kwargs,
    ).images


class CamouflageLight:
    """Anonymize with the trained attribute adapter (+ optionally some structure ControlNets).

    No identity-reconstruction branch: one UNet pass per step for each CFG half, so fewer network
    evaluations per step than Base. Persons come from the annotation path (records -> ``PersonBatch``).
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        encoder: AttributeEncoder,
        adapter_config: AdapterConfig,
        controls: Sequence[Any] = (),
        guidance_scale: float = 7.5,
        num_inference_steps: int = 25,
        negative_prompt: str = "",
        adapter_scale: float | None = None,
    ) -> None:

        self.backbone, self.encoder, self.adapter_config = backbone, encoder, adapter_config
        self.controls = list(controls)
        self.guidance_scale, self.num_inference_steps, self.negative_prompt = (
            guidance_scale,
            num_inference_steps,
            negative_prompt,
        )
        if self.controls:
            self.pipe = stock_controlnet_pipeline(backbone, [c.controlnet for c in self.controls])
        else:
            self.pipe = build_pipeline(
                backbone.vae, backbone.text_encoder, backbone.tokenizer, backbone.unet, backbone.noise_scheduler.config
            )
        if adapter_scale is not None:
            self.set_adapter_scale(adapter_scale)

    @classmethod
    def from_checkpoint(cls, path: str, weight_dtype: str | None = None, **kwargs: Any) -> CamouflageLight:
        """Rebuild the frozen backbone named in a training checkpoint and load its adapter weights."""
        from camouflage_train.modules.light_module import LightAdapterModule
        from camouflage_train.utils.checkpoints import read_checkpoint

        hparams = read_checkpoint(path, key="checkpoint")["hyper_parameters"]
        backbone_cfg = dict(hparams["backbone"], **({"weight_dtype": weight_dtype} if weight_dtype else {}))
        with warnings.catch_warnings():  # frozen weights are not in our checkpoints, by design
            warnings.filterwarnings("ignore", message=".*are in the model state dict but not in the checkpoint.*")
            module = LightAdapterModule.load_from_checkpoint(
                path, map_location="cpu", optimizer=None, backbone=backbone_cfg, weights_only=True
            )
        for part in adapter_modules(module.unet):  # inference: the adapter runs in the backbone's dtype
            part.to(module.unet.dtype)
        backbone = FrozenBackbone(
            vae=module.vae,
            text_encoder=module.text_encoder,
            tokenizer=module.tokenizer,
            unet=module.unet,
            noise_scheduler=module.noise_scheduler,
            name=module.backbone_name,
            source=module.backbone_source,
        )
        return cls(backbone, module.encoder.eval(), module.adapter_config, **kwargs)

    def set_adapter_scale(self, scale: float) -> None:
        for processor in self.backbone.unet.attn_processors.values():
            if hasattr(processor, "to_k_ip"):
                processor.scale = [scale]

    def to(self, device: torch.device | str) -> CamouflageLight:
        self.pipe.to(device)
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self, images: Sequence[Image.Image], persons: PersonBatch, seeds: Sequence[int], prompts: Sequence[str]
    ) -> list[Image.Image]:
        width, height = images[0].size
        device = self.pipe._execution_device
        persons = PersonBatch(
            *(t.to(device) for t in (persons.boxes, persons.continuous, persons.categorical, persons.mask))
        )
        kwargs = control_kwargs(self.controls, images) if self.controls else {}
        return generate_light(
            self.pipe,
            self.encoder,
            self.adapter_config,
            persons,
            list(prompts),
            height,
            width,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seeds=seeds,
            negative_prompt=self.negative_prompt,
            **kwargs,
        )
