"""CAMOUFLaGE-Light inference: the attribute adapter through stock diffusers pipelines.

The person embeddings go in as ``ip_adapter_image_embeds`` and the person regions as
``cross_attention_kwargs={"ip_adapter_masks": [masks]}``: nothing here is a custom sampler, so what
validation shows is what a downstream diffusers user gets. Under classifier-free guidance the negative
half has no persons at all (all-zero masks), i.e. it is the frozen SD model, as in training's
attribute dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from camouflage_train.errors import UserError
from camouflage_train.models.attribute_encoder import AttributeEncoder, encoder_state_dict
from camouflage_train.models.backbone import FrozenBackbone, load_frozen_backbone
from camouflage_train.models.conditioning import PersonBatch, conditioning_inputs
from camouflage_train.models.ip_adapter import AdapterConfig, adapter_modules, checkpoint_state_dict, install_ip_adapter
from camouflage_train.pipelines.base import build_controls, control_kwargs, stock_controlnet_pipeline
from camouflage_train.utils.checkpoints import read_checkpoint


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


@contextlib.contextmanager
def persons_per_prompt(pipe: StableDiffusionPipeline) -> Iterator[None]:
    """For the duration of one call, ``pipe`` takes ``ip_adapter_image_embeds`` as one row per prompt.

    diffusers' SD pipelines repeat the embeddings ``batch_size * num_images_per_prompt`` times: they expect one
    image's embedding shared by every prompt. Light's embeddings already hold one row of persons per prompt, and
    repeated they would reach the attention as a ``[batch * batch]`` stack that the stock processor silently
    reshapes into each image attending to every image's persons. So the repetition is switched off (one image per
    prompt; ``generate_light`` refuses ``num_images_per_prompt``) and restored afterwards.
    """
    if "prepare_ip_adapter_image_embeds" in vars(pipe):
        raise RuntimeError("the pipeline's prepare_ip_adapter_image_embeds is already replaced")
    stock = pipe.prepare_ip_adapter_image_embeds

    def one_row_per_prompt(image: Any, image_embeds: Any, device: Any, _repeats: int, guidance: bool) -> Any:
        return stock(image, image_embeds, device, 1, guidance)

    pipe.prepare_ip_adapter_image_embeds = one_row_per_prompt
    try:
        yield
    finally:
        del pipe.prepare_ip_adapter_image_embeds


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
    """One image per prompt; image ``i`` uses ``seeds[i]`` (default ``seed + i``) and ``persons[i]`` whatever the
    batch.

    ``pipe`` may be a stock SD or ControlNet pipeline; ``pipe_kwargs`` go to it (control images, scales).
    """
    if "num_images_per_prompt" in pipe_kwargs:
        raise ValueError("generate_light makes one image per prompt (repeat the prompts and persons instead)")
    if persons.boxes.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but persons for {persons.boxes.shape[0]} images")
    scale = pipe.vae_scale_factor
    embeds, masks = conditioning_inputs(
        encoder,
        persons,
        (height // scale, width // scale),
        config.region_expand if config.region_masks else None,
        guidance=guidance_scale > 1.0,
    )
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    device = pipe._execution_device
    with persons_per_prompt(pipe):
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
    def from_checkpoint(
        cls, path: str, weight_dtype: str | None = None, cache_dir: str | None = None, **kwargs: Any
    ) -> CamouflageLight:
        """Rebuild the frozen backbone named in a training checkpoint and install its adapter the way an export
        is loaded (the original IP-Adapter layout through diffusers' loader); no training code involved."""
        checkpoint = read_checkpoint(path, key="checkpoint")
        meta = checkpoint.get("camouflage")
        if not meta or "ip_adapter_keys" not in meta:
            raise UserError(f"checkpoint: '{path}' is a Lightning checkpoint but not a camouflage-train Light one")
        backbone_cfg = dict(checkpoint["hyper_parameters"]["backbone"])
        backbone_cfg.update({k: v for k, v in (("weight_dtype", weight_dtype), ("cache_dir", cache_dir)) if v})
        backbone = load_frozen_backbone(**backbone_cfg)
        config = AdapterConfig(**meta["adapter"])
        install_ip_adapter(backbone.unet, checkpoint_state_dict(checkpoint), scale=config.scale)
        for part in adapter_modules(backbone.unet):  # inference: the adapter runs in the backbone's dtype
            part.to(backbone.unet.dtype).requires_grad_(False)
        encoder = AttributeEncoder.from_adapter_config(meta["schema"], config)
        encoder.load_state_dict(encoder_state_dict(checkpoint))
        return cls(backbone, encoder.eval(), config, **kwargs)

    def set_adapter_scale(self, scale: float) -> None:
        self.pipe.set_ip_adapter_scale(scale)

    def to(self, device: torch.device | str) -> CamouflageLight:
        self.pipe.to(device)
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self, images: Sequence[Image.Image], persons: PersonBatch, seeds: Sequence[int], prompts: Sequence[str]
    ) -> list[Image.Image]:
        width, height = images[0].size
        persons = persons.to(self.pipe._execution_device)
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


def build_light(
    checkpoint: str,
    weight_dtype: str = "fp32",
    controlnets: Mapping[str, Mapping[str, Any]] | None = None,
    cache_dir: str | None = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 25,
    negative_prompt: str = "",
    adapter_scale: float | None = None,
) -> CamouflageLight:
    """``configs/anonymize/model/light*.yaml``: a training checkpoint's backbone and adapter, plus optional
    structure ControlNets."""
    return CamouflageLight.from_checkpoint(
        checkpoint,
        weight_dtype=weight_dtype,
        cache_dir=cache_dir,
        controls=build_controls(controlnets or {}, weight_dtype, cache_dir),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        negative_prompt=negative_prompt,
        adapter_scale=adapter_scale,
    )
