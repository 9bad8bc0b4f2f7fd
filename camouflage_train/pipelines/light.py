"""CAMOUFLaGE-Light inference: the attribute adapter through stock diffusers pipelines.

The person embeddings go in as ``ip_adapter_image_embeds`` and the person regions as
``cross_attention_kwargs={"ip_adapter_masks": [masks]}``: nothing here is a custom sampler, so what
validation shows is what a downstream diffusers user gets. Under classifier-free guidance the negative
half has no persons at all (all-zero masks), i.e. it is the frozen SD model, as in training's
attribute dropout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image

from camouflage_train.compat.diffusers_internals import execution_device
from camouflage_train.errors import UserError
from camouflage_train.models.adapter_checkpoint import NotALightCheckpoint, read_metadata
from camouflage_train.models.attribute_encoder import AttributeEncoder, encoder_state_dict
from camouflage_train.models.backbone import FrozenBackbone, load_frozen_backbone
from camouflage_train.models.conditioning import PersonBatch, conditioning_inputs
from camouflage_train.models.ip_adapter import (
    AdapterConfig,
    adapter_modules,
    checkpoint_state_dict,
    install_ip_adapter,
)
from camouflage_train.pipelines.base import build_controls, control_kwargs, stock_controlnet_pipeline
from camouflage_train.pipelines.regions import background_keeper, paste_outside
from camouflage_train.pipelines.sampling import SAMPLING
from camouflage_train.utils.checkpoints import read_checkpoint


def make_scheduler(scheduler_config: Mapping[str, Any], name: str = "DDIMScheduler", **options: Any) -> Any:
    """A diffusers sampler by class name, on the backbone's noise schedule.

    The adapter is trained for epsilon prediction on the standard schedule, so the sampler is free at inference:
    ``DDIMScheduler`` (the default), or a higher-order solver for fewer steps, e.g. ``DPMSolverMultistepScheduler``
    (DPM-Solver++) or ``UniPCMultistepScheduler``.

    Args:
        scheduler_config: the backbone's noise scheduler config.
        name: a scheduler class of ``diffusers``.
        options: overrides of its config (``algorithm_type``, ``solver_order``, ...).
    """
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"scheduler: '{name}' is not a diffusers scheduler class (e.g. DPMSolverMultistepScheduler)")
    return cls.from_config(dict(scheduler_config), **options)


class OneRowOfPersonsPerPrompt:
    """A diffusers Stable Diffusion pipeline whose ``ip_adapter_image_embeds`` hold one row of persons per prompt.

    Stock pipelines repeat the embeddings ``batch_size * num_images_per_prompt`` times: they expect one image's
    embedding shared by every prompt. Light's embeddings already hold one row of persons per prompt; repeated,
    they would reach the attention as a ``[batch * batch]`` stack that the stock processor silently reshapes into
    each image attending to every image's persons. Mixed in before a pipeline class, this override of the
    pipelines' public ``prepare_ip_adapter_image_embeds`` keeps the rows as given (one image per prompt:
    :func:`generate_light` refuses ``num_images_per_prompt``). Everything else is the stock pipeline.
    """

    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image: Any,
        ip_adapter_image_embeds: Any,
        device: Any,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> Any:
        """The stock preparation with no repetition of the rows.

        Args:
            ip_adapter_image: must be ``None`` (Light passes embeddings).
            ip_adapter_image_embeds: ``[embeds]`` with one row per prompt (negative half first under guidance).
            device: where the embeddings go.
            num_images_per_prompt: ignored: each row is already one prompt's.
            do_classifier_free_guidance: whether the rows hold a negative and a positive half.
        """
        return super().prepare_ip_adapter_image_embeds(  # type: ignore[misc]
            ip_adapter_image, ip_adapter_image_embeds, device, 1, do_classifier_free_guidance
        )


class LightStableDiffusionPipeline(OneRowOfPersonsPerPrompt, StableDiffusionPipeline):
    """diffusers' ``StableDiffusionPipeline`` taking one row of persons per prompt."""


class LightControlNetPipeline(OneRowOfPersonsPerPrompt, StableDiffusionControlNetPipeline):
    """diffusers' ``StableDiffusionControlNetPipeline`` taking one row of persons per prompt."""


_LIGHT_PIPELINES = {
    StableDiffusionPipeline: LightStableDiffusionPipeline,
    StableDiffusionControlNetPipeline: LightControlNetPipeline,
}


def as_light_pipeline(pipe: Any) -> OneRowOfPersonsPerPrompt:
    """The same modules (not copies) in the Light variant of ``pipe``'s class.

    Args:
        pipe: a stock ``StableDiffusionPipeline`` or ``StableDiffusionControlNetPipeline`` (e.g. from
            ``from_pretrained``), or an already converted one (returned as it is).
    """
    if isinstance(pipe, OneRowOfPersonsPerPrompt):
        return pipe
    light_class = _LIGHT_PIPELINES.get(type(pipe))
    if light_class is None:
        raise TypeError(
            f"{type(pipe).__name__} has no Light variant; use a StableDiffusionPipeline or "
            "StableDiffusionControlNetPipeline"
        )
    converted = light_class(**pipe.components, requires_safety_checker=False)
    converted.set_progress_bar_config(disable=True)
    return converted


def build_pipeline(
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: object,
    unet: torch.nn.Module,
    scheduler_config: dict,
    scheduler: Any = None,
) -> LightStableDiffusionPipeline:
    """A Light SD pipeline around already-loaded modules (no copies, no safety checker).

    Args:
        vae: the frozen VAE.
        text_encoder: the frozen text encoder.
        tokenizer: its tokenizer.
        unet: the UNet with the adapter installed.
        scheduler_config: the backbone's noise scheduler config (DDIM is built on it by default).
        scheduler: a sampler instance to use instead (:func:`make_scheduler`).
    """
    pipe = LightStableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler if scheduler is not None else DDIMScheduler.from_config(scheduler_config),
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
    num_inference_steps: int = SAMPLING.num_inference_steps,
    guidance_scale: float = SAMPLING.guidance_scale,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    negative_prompt: str | None = None,
    output_type: str = "pil",
    **pipe_kwargs: Any,
) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses ``seeds[i]`` (default ``seed + i``) and ``persons[i]`` whatever the
    batch.

    ``pipe`` is a Light SD or ControlNet pipeline; ``pipe_kwargs`` go to it (control images, scales).

    Args:
        pipe: a Light pipeline (:func:`as_light_pipeline`); keyword arguments beyond these go to it.
        encoder: the attribute encoder.
        config: the adapter's config (regions).
        persons: one row of persons per image.
        prompts: one prompt per image.
        height: the image height.
        width: the image width.
        num_inference_steps: sampler steps.
        guidance_scale: the classifier-free guidance scale.
        seed: image ``i`` uses ``seed + i`` (without ``seeds``).
        seeds: one seed per image.
        negative_prompt: the negative branch's prompt.
        output_type: ``pil``, ``np`` or ``pt``.
    """
    if not isinstance(pipe, OneRowOfPersonsPerPrompt):
        raise TypeError(
            f"generate_light needs a pipeline that takes one row of persons per prompt, got {type(pipe).__name__}: "
            "convert it with camouflage_train.pipelines.light.as_light_pipeline(pipe)"
        )
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
        unconditional_half=guidance_scale > 1.0,
        region_overlap=config.region_overlap,
        face_expand=config.face_expand,
    )
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    device = execution_device(pipe)
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

    Args:
        backbone: the frozen SD with the adapter installed.
        encoder: the attribute encoder.
        adapter_config: the adapter's config.
        controls: optional structure ControlNets.
        guidance_scale: the classifier-free guidance scale.
        num_inference_steps: sampler steps.
        negative_prompt: the negative branch's prompt.
        adapter_scale: the adapter attention's weight (``None``: the trained one).
        scheduler: ``{name, **options}`` of a diffusers sampler (:func:`make_scheduler`; default DDIM).
        keep_background: keep the real scene outside the person regions
            (:class:`~camouflage_train.pipelines.regions.KeepBackground`).
        paste_feather: with ``keep_background``, blend the drawn regions into the real scene over this share of
            the image's shorter side (:func:`~camouflage_train.pipelines.regions.paste_outside`; 0: hard borders).
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        encoder: AttributeEncoder,
        adapter_config: AdapterConfig,
        controls: Sequence[Any] = (),
        guidance_scale: float = SAMPLING.guidance_scale,
        num_inference_steps: int = SAMPLING.num_inference_steps,
        negative_prompt: str = SAMPLING.negative_prompt,
        adapter_scale: float | None = None,
        scheduler: Mapping[str, Any] | None = None,
        keep_background: bool = False,
        paste_feather: float = 0.0,
    ) -> None:
        self.backbone, self.encoder, self.adapter_config = backbone, encoder, adapter_config
        self.keep_background, self.paste_feather = keep_background, paste_feather
        self.controls = list(controls)
        self.guidance_scale, self.num_inference_steps, self.negative_prompt = (
            guidance_scale,
            num_inference_steps,
            negative_prompt,
        )
        if self.controls:
            self.pipe = stock_controlnet_pipeline(
                backbone, [c.controlnet for c in self.controls], pipeline_class=LightControlNetPipeline
            )
        else:
            self.pipe = build_pipeline(
                backbone.vae, backbone.text_encoder, backbone.tokenizer, backbone.unet, backbone.noise_scheduler.config
            )
        if scheduler:
            options = dict(scheduler)
            self.pipe.scheduler = make_scheduler(backbone.noise_scheduler.config, options.pop("name"), **options)
        if adapter_scale is not None:
            self.set_adapter_scale(adapter_scale)

    @classmethod
    def from_checkpoint(
        cls, path: str, weight_dtype: str | None = None, cache_dir: str | None = None, **kwargs: Any
    ) -> CamouflageLight:
        """Rebuild the frozen backbone named in a training checkpoint and install its adapter the way an export
        is loaded (the original IP-Adapter layout through diffusers' loader); no training code involved.

        Args:
            path: the Light training checkpoint (keyword arguments go to the constructor).
            weight_dtype: the frozen weights' dtype (default the training's).
            cache_dir: where hub downloads go.
        """
        checkpoint = read_checkpoint(path, key="checkpoint")
        try:
            meta = read_metadata(checkpoint, path)
        except NotALightCheckpoint as error:
            raise UserError(str(error)) from None
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
        """Weight the adapter's attention by ``scale`` in every layer.

        Args:
            scale: the weight (0: the frozen base alone).
        """
        self.pipe.set_ip_adapter_scale(scale)

    def to(self, device: torch.device | str) -> CamouflageLight:
        """Move the pipeline and the encoder to ``device``; returns itself.

        Args:
            device: the target device.
        """
        self.pipe.to(device)
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self, images: Sequence[Image.Image], persons: PersonBatch, seeds: Sequence[int], prompts: Sequence[str]
    ) -> list[Image.Image]:
        width, height = images[0].size
        persons = persons.to(execution_device(self.pipe))
        if not self.encoder.uses_extents:  # trained without bodies: its regions, kept scene and paste are at faces
            persons = persons.face_only()
        kwargs = control_kwargs(self.controls, images) if self.controls else {}
        if self.keep_background:
            keeper = background_keeper(self.pipe, images, persons, seeds, self.adapter_config.region_expand)
            kwargs.update(callback_on_step_end=keeper, callback_on_step_end_tensor_inputs=["latents"])
        generated = generate_light(
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
        if self.keep_background:
            return paste_outside(
                images, generated, persons, self.adapter_config.region_expand, feather=self.paste_feather
            )
        return generated


def _light_metadata(path: str | Path, key: str) -> dict[str, Any]:
    """A Light training checkpoint's metadata, the file mapped, not read (the checks before a run and the stand-in
    report need nothing else); a clear error naming ``key`` for a file that is not one."""
    try:
        return read_metadata(read_checkpoint(path, key=key, mmap=True), path, key)
    except NotALightCheckpoint as error:
        raise UserError(str(error)) from None


def checkpoint_base_model(path: str | Path, key: str = "checkpoint") -> str:
    """The frozen base a Light training checkpoint was trained on, as its config named it (hub id, folder or
    ``preset:<name>``); a clear error naming ``key`` for a file that is not a Light training checkpoint.

    Args:
        path: the Light training checkpoint.
        key: the config key that names it, for errors.
    """
    return str(_light_metadata(path, key)["backbone"])


def check_checkpoint_base(
    checkpoint: str | Path,
    base_model: str | None,
    key: str = "model.checkpoint",
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """Refuse a Light training checkpoint trained on another base than ``base_model`` (``None``: any), naming both;
    with the run's ``attributes``, also one trained with body extents in a run whose attributes have none (it would
    be fed face boxes as extents and redraw faces only, without a word; an adapter trained without bodies runs on its
    face boxes whatever the run's schema: :meth:`CamouflageLight.__call__`).

    Args:
        checkpoint: the Light training checkpoint.
        base_model: the base the anonymizer config is for.
        key: the config key that names the checkpoint, for errors.
        attributes: the run's attribute schema config (``None``: not checked).
    """
    meta = _light_metadata(checkpoint, key)
    trained_on = str(meta["backbone"])
    if base_model is not None and trained_on != base_model:
        raise UserError(
            f"{key}: {checkpoint} was trained on the base '{trained_on}', but this anonymizer config is for "
            f"'{base_model}' (its base_model): pass a checkpoint trained on '{base_model}', or the anonymizer config "
            f"made for '{trained_on}'"
        )
    if attributes is not None and meta["schema"].get("body") is not None and attributes.get("body") is None:
        raise UserError(
            f"{key}: {checkpoint} was trained with body extents (its schema's 'body'), but the run's attributes have "
            "none, so only faces would be redrawn: run with attributes=face (or the schema it was trained on)"
        )


def build_light(
    checkpoint: str,
    weight_dtype: str = "fp32",
    controlnets: Mapping[str, Mapping[str, Any]] | None = None,
    cache_dir: str | None = None,
    guidance_scale: float = SAMPLING.guidance_scale,
    num_inference_steps: int = SAMPLING.num_inference_steps,
    negative_prompt: str = SAMPLING.negative_prompt,
    adapter_scale: float | None = None,
    scheduler: Mapping[str, Any] | None = None,
    keep_background: bool = False,
    paste_feather: float = 0.0,
    base_model: str | None = None,
) -> CamouflageLight:
    """``configs/anonymize/model/light*.yaml``: a training checkpoint's backbone and adapter, plus optional
    structure ControlNets, the sampler and whether the scene outside the persons is kept.

    A checkpoint trained on another base than ``base_model`` is refused before anything is loaded: the config's
    ControlNets, sampler and guidance were chosen for that base.

    Args:
        checkpoint: the Light training checkpoint.
        weight_dtype: the frozen weights' dtype.
        controlnets: optional ``{name: {model, preprocessor, scale, start, end}}``.
        cache_dir: where hub downloads go.
        guidance_scale: the classifier-free guidance scale.
        num_inference_steps: sampler steps.
        negative_prompt: the negative branch's prompt.
        adapter_scale: the adapter attention's weight.
        scheduler: ``{name, **options}`` of a diffusers sampler.
        keep_background: keep the real scene outside the person regions.
        paste_feather: the width of the blend into the real scene (a share of the image's shorter side).
        base_model: the base this config is for (``None``: any; the checkpoint's base is loaded).
    """
    check_checkpoint_base(checkpoint, base_model)
    return CamouflageLight.from_checkpoint(
        checkpoint,
        weight_dtype=weight_dtype,
        cache_dir=cache_dir,
        controls=build_controls(controlnets or {}, weight_dtype, cache_dir),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        negative_prompt=negative_prompt,
        adapter_scale=adapter_scale,
        scheduler=scheduler,
        keep_background=keep_background,
        paste_feather=paste_feather,
    )
