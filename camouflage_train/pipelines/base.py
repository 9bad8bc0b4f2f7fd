"""CAMOUFLaGE-Base: frozen SD 1.5 + several ControlNets + anonymization guidance. Nothing is trained.

The structure ControlNets (depth, normal, segmentation, pose, line art, ...) condition both branches of
classifier-free guidance as usual. Anonymization guidance adds a *reconstruction* ControlNet fed with the
real image (e.g. tile) to the **negative** branch only, so the negative prediction is pulled towards the
real image and guidance pushes the sample away from it:

    eps = eps_neg + s * (eps_pos - eps_neg)
    eps_pos = UNet(x_t, t, prompt,          controls)
    eps_neg = UNet(x_t, t, negative prompt, controls + w * m * ReconControlNet(x_t, real image))

with ``s`` the guidance scale, ``w`` the reconstruction scale (``anonymization.scale``), ``m`` an optional
person-region mask, applied only for the step fraction ``[anonymization.start, anonymization.end]``.
It runs as one extra ControlNet pass (negative half of the batch) per step inside the stock diffusers
ControlNet pipeline: with the branch disabled the output is exactly the stock pipeline's.

With ``keep_background`` only the persons' regions (their extents: the whole person under a schema with
``body``) are redrawn and the real scene is kept outside them (:mod:`camouflage_train.pipelines.regions`), so
the sampling can start from noise (``strength`` ``None``) without losing the scene: nothing of a person's
colours then survives but what the structure ControlNets carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    MultiControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
)
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from camouflage_train.compat.diffusers_internals import execution_device
from camouflage_train.models.backbone import (
    FrozenBackbone,
    backbone_source,
    controlnet_source,
    load_controlnet,
    load_frozen_backbone,
    parse_dtype,
)
from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.models.ip_adapter import DEFAULT_REGION_EXPAND
from camouflage_train.pipelines.controls import Preprocessor
from camouflage_train.pipelines.regions import background_keeper, paste_outside
from camouflage_train.pipelines.sampling import SAMPLING


class ReconstructionBranch(nn.Module):
    """A ControlNet that conditions only the negative (first) half of a CFG batch, optionally only inside
    ``region_mask`` (``[B, 1, h, w]`` at latent resolution); the positive half gets zero residuals.

    Args:
        controlnet: the reconstruction ControlNet.
    """

    def __init__(self, controlnet: nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.region_mask: torch.Tensor | None = None

    @property
    def config(self) -> Any:
        """The wrapped ControlNet's config (what the pipeline reads)."""
        return self.controlnet.config

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        **kwargs: Any,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if sample.shape[0] % 2:
            raise ValueError("anonymization guidance needs classifier-free guidance (guidance_scale > 1)")
        half = sample.shape[0] // 2
        if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == sample.shape[0]:
            timestep = timestep[:half]
        kwargs["return_dict"] = False
        down, mid = self.controlnet(
            sample[:half],
            timestep,
            encoder_hidden_states=encoder_hidden_states[:half],
            controlnet_cond=controlnet_cond[:half],
            conditioning_scale=conditioning_scale,
            **kwargs,
        )
        if self.region_mask is not None:
            mask = self.region_mask.to(mid.device, mid.dtype)
            down = [d * F.interpolate(mask, size=d.shape[-2:], mode="area") for d in down]
            mid = mid * F.interpolate(mask, size=mid.shape[-2:], mode="area")
        pad = lambda t: torch.cat([t, torch.zeros_like(t)])  # noqa: E731
        return [pad(d) for d in down], pad(mid)


@dataclass
class ControlSpec:
    """One structure ControlNet: its weights, how its conditioning image is made, and when it acts.

    Args:
        name: its config name.
        controlnet: the loaded ControlNet.
        preprocessor: image -> conditioning image.
        scale: its conditioning scale.
        start: the step fraction where it starts acting.
        end: the step fraction where it stops.
    """

    name: str
    controlnet: nn.Module
    preprocessor: Preprocessor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def build_controls(
    specs: Mapping[str, Mapping[str, Any]], weight_dtype: str, cache_dir: str | None
) -> list[ControlSpec]:
    """``{name: {model, preprocessor, scale, start, end}}`` (preprocessor already instantiated) -> specs.

    Args:
        specs: the ``controlnets`` config.
        weight_dtype: the ControlNets' dtype.
        cache_dir: where hub downloads go.
    """
    return [
        ControlSpec(
            name=name,
            controlnet=load_controlnet(
                spec["model"], weight_dtype, cache_dir=cache_dir, config_key=f"model.controlnets.{name}.model"
            ),
            preprocessor=spec["preprocessor"],
            scale=float(spec.get("scale", 1.0)),
            start=float(spec.get("start", 0.0)),
            end=float(spec.get("end", 1.0)),
        )
        for name, spec in specs.items()
    ]


def stock_controlnet_pipeline(
    backbone: FrozenBackbone,
    controlnets: Sequence[nn.Module],
    img2img: bool = False,
    pipeline_class: type[StableDiffusionControlNetPipeline] | None = None,
) -> StableDiffusionControlNetPipeline:
    """The stock diffusers (img2img) ControlNet pipeline around already-loaded modules (no copies).

    Args:
        backbone: the frozen SD components.
        controlnets: the ControlNets, in the order their images will be passed.
        img2img: start from the input image (``StableDiffusionControlNetImg2ImgPipeline``).
        pipeline_class: a subclass of the chosen pipeline class to build instead.
    """
    cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
    if pipeline_class is not None:
        if not issubclass(pipeline_class, cls):
            raise TypeError(f"pipeline_class {pipeline_class.__name__} is not a {cls.__name__}")
        cls = pipeline_class
    pipe = cls(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        controlnet=MultiControlNetModel(list(controlnets)),
        scheduler=DDIMScheduler.from_config(backbone.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stack_images(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images as one ``[B, 3, H, W]`` float batch in ``[0, 1]``.

    Args:
        images: images of one size.
    """
    return torch.stack([TF.to_dtype(TF.to_image(image.convert("RGB")), torch.float32, scale=True) for image in images])


def control_kwargs(controls: Sequence[ControlSpec], images: Sequence[Image.Image]) -> dict[str, list[Any]]:
    """Conditioning images (per ControlNet, a ``[B, 3, H, W]`` batch in [0, 1], the form both stock ControlNet
    pipelines accept for batches), scales and step ranges.

    Args:
        controls: the structure ControlNets.
        images: the real images.
    """
    return {
        "image": [stack_images([c.preprocessor(image) for image in images]) for c in controls],
        "controlnet_conditioning_scale": [c.scale for c in controls],
        "control_guidance_start": [c.start for c in controls],
        "control_guidance_end": [c.end for c in controls],
    }


def generator_list(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per image, so image i depends on its own seed and not on the batch.

    Args:
        seeds: one seed per image.
        device: where the noise is drawn.
    """
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


class CamouflageBase:
    """Anonymize images with structure ControlNets + anonymization guidance (see the module docstring).

    Args:
        backbone: the frozen SD components.
        controls: the structure ControlNets.
        anonymization: ``{enabled, model, scale, start, end, person_regions}``; ``model`` is the
            reconstruction ControlNet (hub id, folder or preset), fed with the real image.
        guidance_scale: the classifier-free guidance scale.
        num_inference_steps: sampler steps (img2img runs ``strength`` of them).
        strength: ``None`` to start from noise, else img2img from the real image's noised latents.
        prompt: the prompt of images whose own prompt is empty.
        negative_prompt: the negative branch's prompt.
        cache_dir: where hub downloads go.
        region_expand: the persons' regions are their extents grown this much (``anonymization.person_regions``,
            ``keep_background``).
        keep_background: redraw only the persons' regions, keeping the real scene outside them.
        paste_feather: with ``keep_background``, blend the redrawn regions into the real scene over this share of
            the image's shorter side (0: hard borders).
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        controls: Sequence[ControlSpec],
        anonymization: Mapping[str, Any] | None = None,
        guidance_scale: float = SAMPLING.guidance_scale,
        num_inference_steps: int = SAMPLING.num_inference_steps,
        strength: float | None = None,
        prompt: str = SAMPLING.prompt,
        negative_prompt: str = SAMPLING.negative_prompt,
        cache_dir: str | None = None,
        region_expand: float = DEFAULT_REGION_EXPAND,
        keep_background: bool = False,
        paste_feather: float = 0.0,
    ) -> None:
        if keep_background and strength is not None:
            raise ValueError(
                "keep_background redraws the persons from noise: set strength to null (img2img runs a truncated "
                "schedule the kept scene would be noised against wrongly)"
            )
        self.backbone, self.controls = backbone, list(controls)
        self.region_expand, self.keep_background, self.paste_feather = region_expand, keep_background, paste_feather
        self.anonymization = dict(anonymization or {})
        self.guidance_scale, self.num_inference_steps, self.strength = guidance_scale, num_inference_steps, strength
        self.prompt, self.negative_prompt = prompt, negative_prompt
        nets: list[nn.Module] = [c.controlnet for c in self.controls]
        self.reconstruction: ReconstructionBranch | None = None
        if self.anonymization.get("enabled"):
            if guidance_scale <= 1.0:
                raise ValueError("anonymization guidance acts through the negative branch: set guidance_scale > 1")
            dtype = str(backbone.unet.dtype).removeprefix("torch.")
            recon = load_controlnet(
                self.anonymization["model"],
                parse_dtype(dtype),
                cache_dir=cache_dir,
                config_key="model.anonymization.model",
            )
            self.reconstruction = ReconstructionBranch(recon)
            nets.append(self.reconstruction)
        if not nets:
            raise ValueError("CAMOUFLaGE-Base needs at least one ControlNet or the anonymization branch")
        self.pipe = stock_controlnet_pipeline(backbone, nets, img2img=strength is not None)

    def to(self, device: torch.device | str) -> CamouflageBase:
        """Move the pipeline to ``device``; returns itself.

        Args:
            device: the target device.
        """
        self.pipe.to(device)
        return self

    def pipeline_kwargs(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """The stock pipeline's ControlNet arguments for ``images``; the reconstruction branch comes last.

        Args:
            images: the real images.
        """
        kwargs = control_kwargs(self.controls, images)
        if self.reconstruction is not None:
            kwargs["image"].append(stack_images(images))
            kwargs["controlnet_conditioning_scale"].append(float(self.anonymization.get("scale", 1.0)))
            kwargs["control_guidance_start"].append(float(self.anonymization.get("start", 0.0)))
            kwargs["control_guidance_end"].append(float(self.anonymization.get("end", 1.0)))
        if self.strength is not None:
            kwargs["control_image"] = kwargs.pop("image")
            kwargs.update(image=list(images), strength=self.strength)
        return kwargs

    @torch.no_grad()
    def __call__(
        self, images: Sequence[Image.Image], persons: PersonBatch, seeds: Sequence[int], prompts: Sequence[str]
    ) -> list[Image.Image]:
        """Anonymize ``images`` (all of one size); with ``anonymization.person_regions`` the guidance acts only in
        the persons' regions, with ``keep_background`` only they are redrawn."""
        width, height = images[0].size
        if self.reconstruction is not None:
            regions = None
            if self.anonymization.get("person_regions"):
                latent = (height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)
                masks = persons.region_masks(latent, self.region_expand)
                # The negative half of the CFG batch is the first B entries, which these masks describe.
                regions = masks.amax(dim=1, keepdim=True).to(execution_device(self.pipe))
            self.reconstruction.region_mask = regions
        prompts = [prompt or self.prompt for prompt in prompts]
        kwargs = self.pipeline_kwargs(images)
        if self.keep_background:
            keeper = background_keeper(self.pipe, images, persons, seeds, self.region_expand)
            kwargs.update(callback_on_step_end=keeper, callback_on_step_end_tensor_inputs=["latents"])
        generated = self.pipe(
            prompt=prompts,
            negative_prompt=[self.negative_prompt] * len(images),
            height=height,
            width=width,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generator_list(seeds, execution_device(self.pipe)),
            output_type="pil",
            **kwargs,
        ).images
        if self.keep_background:
            return paste_outside(images, generated, persons, self.region_expand, feather=self.paste_feather)
        return generated


def check_sources(
    backbone: Mapping[str, Any], controlnets: Mapping[str, Mapping[str, Any]], anonymization: Mapping[str, Any]
) -> None:
    """Check that the backbone and every ControlNet can be loaded from where the config says, downloading nothing.

    Args:
        backbone: :func:`load_frozen_backbone`'s arguments.
        controlnets: ``{name: {model, ...}}``.
        anonymization: the anonymization branch's config (``enabled``, ``model``).
    """
    cache_dir = backbone.get("cache_dir")
    backbone_source(
        backbone["pretrained_model_name_or_path"],
        backbone.get("revision"),
        backbone.get("variant"),
        cache_dir,
        config_key="model.backbone.pretrained_model_name_or_path",
    )
    named = {f"model.controlnets.{name}.model": spec["model"] for name, spec in controlnets.items()}
    if anonymization.get("enabled"):
        named["model.anonymization.model"] = anonymization["model"]
    for key, model in named.items():
        controlnet_source(model, cache_dir=cache_dir, config_key=key)


def build_base(
    backbone: Mapping[str, Any],
    controlnets: Mapping[str, Mapping[str, Any]],
    anonymization: Mapping[str, Any],
    guidance_scale: float = SAMPLING.guidance_scale,
    num_inference_steps: int = SAMPLING.num_inference_steps,
    strength: float | None = None,
    prompt: str = SAMPLING.prompt,
    negative_prompt: str = SAMPLING.negative_prompt,
    region_expand: float = DEFAULT_REGION_EXPAND,
    keep_background: bool = False,
    paste_feather: float = 0.0,
) -> CamouflageBase:
    """``configs/anonymize/model/base*.yaml``: the frozen SD, the structure ControlNets and the reconstruction
    ControlNet.

    Every hub repository is checked (its file list read, the files to load chosen) before the first download, so a
    missing or gated repository or one without a readable weights file stops the run before gigabytes of others
    are fetched.

    Args:
        backbone: :func:`load_frozen_backbone`'s arguments.
        controlnets: ``{name: {model, preprocessor, scale, start, end}}``.
        anonymization: the anonymization guidance: ``{enabled, model, scale, start, end, person_regions}``.
        guidance_scale: the classifier-free guidance scale.
        num_inference_steps: sampler steps.
        strength: ``None``: from noise; else img2img strength.
        prompt: the prompt of images without one.
        negative_prompt: the negative branch's prompt.
        region_expand: the person regions' growth (``anonymization.person_regions``, ``keep_background``).
        keep_background: redraw only the persons' regions, keeping the real scene outside them.
        paste_feather: the width of the blend into the real scene (a share of the image's shorter side).
    """
    check_sources(backbone, controlnets, anonymization)
    frozen = load_frozen_backbone(**backbone)
    controls = build_controls(controlnets, backbone.get("weight_dtype", "fp32"), backbone.get("cache_dir"))
    return CamouflageBase(
        frozen,
        controls,
        dict(anonymization),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        strength=strength,
        prompt=prompt,
        negative_prompt=negative_prompt,
        cache_dir=backbone.get("cache_dir"),
        region_expand=region_expand,
        keep_background=keep_background,
        paste_feather=paste_feather,
    )
