"""Load the frozen Stable Diffusion components (VAE, text encoder, tokenizer, UNet, noise scheduler).

``pretrained_model_name_or_path`` is a hub id, a local diffusers folder, or ``preset:<name>`` for the
random-weight stand-ins in :mod:`camouflage_train.models.presets`. Hub ids go through
:mod:`camouflage_train.utils.hub`: the repository's file list is read first and exactly the files the loaders read
are downloaded (each component's safetensors weights, or its ``.bin`` weights where the repository has no
safetensors), so a missing file or an offline machine fails in well under a second with a message saying how to
supply a local copy, instead of after gigabytes of downloads or, worse, with transformers' silent 2-token dummy
tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camouflage_train.models.presets import CLIP_VOCAB_SIZE, PRESET_PREFIX, materialize_preset
from camouflage_train.utils.hub import HubError, HubPlan, Want, plan_files, weight_file

COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class BackboneUnavailableError(HubError):
    """The Stable Diffusion weights cannot be found locally or downloaded."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``fp32`` / ``fp16`` / ``bf16`` (or a ``torch.dtype``) as a ``torch.dtype``.

    Args:
        name: the name or dtype.
    """
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{name}'; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def add_noise_fp32(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``scheduler.add_noise`` computed in fp32, whatever the latents' and noise's dtype (the result is fp32).

    diffusers casts the schedule to its inputs' dtype; in bf16/fp16 the nearly clean timesteps'
    ``sqrt(1 - alpha_bar)`` rounds (in bf16 to no noise at all at t = 0 and 1). The training objectives and Light's
    ``keep_background`` add noise through this function and cast to the UNet's dtype only at its input.

    Args:
        scheduler: a diffusers scheduler with ``add_noise``.
        latents: the clean latents.
        noise: the noise.
        timesteps: the timesteps.
    """
    return scheduler.add_noise(latents.float(), noise.float(), timesteps)


@dataclass
class FrozenBackbone:
    """The frozen SD components; ``source`` is the local folder they were read from.

    Args:
        vae: the autoencoder.
        text_encoder: the CLIP text encoder.
        tokenizer: its tokenizer.
        unet: the UNet (``None`` when loaded without it).
        noise_scheduler: the training noise schedule.
        name: the backbone as configured (hub id, folder or preset).
        source: the local folder it was read from.
    """

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    unet: nn.Module | None
    noise_scheduler: object
    name: str
    source: Path

    def modules(self) -> dict[str, nn.Module]:
        """The loaded networks by name (``vae``, ``text_encoder``, ``unet``)."""
        found = {"vae": self.vae, "text_encoder": self.text_encoder, "unet": self.unet}
        return {name: module for name, module in found.items() if module is not None}


def backbone_wants(variant: str | None = None) -> list[Want]:
    """The files of a diffusers Stable Diffusion repository that :func:`load_frozen_backbone` reads.

    Args:
        variant: the weight variant (``fp16``) or ``None`` for the plain files.
    """
    wants = [Want(("model_index.json",), required=False)]
    wants += [Want((f"{sub}/config.json",)) for sub in ("vae", "text_encoder", "unet")]
    wants += [
        Want(("scheduler/scheduler_config.json",)),
        Want(("tokenizer/vocab.json",)),
        Want(("tokenizer/merges.txt",)),
    ]
    wants += [Want(("tokenizer/*.json",), required=False)]
    wants += [
        weight_file("vae", "diffusion_pytorch_model", variant),
        weight_file("unet", "diffusion_pytorch_model", variant),
        weight_file("text_encoder", "model", variant, bin_stem="pytorch_model"),
    ]
    return wants


def controlnet_wants(variant: str | None = None) -> list[Want]:
    """The files of a diffusers ControlNet repository that :func:`load_controlnet` reads.

    Args:
        variant: the weight variant (``fp16``) or ``None`` for the plain files.
    """
    return [Want(("config.json",)), weight_file("", "diffusion_pytorch_model", variant)]


def backbone_source(
    name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | Path | None = None,
    config_key: str = "model.backbone.pretrained_model_name_or_path",
) -> Path | HubPlan:
    """A preset or local folder (its path), or a hub id (the checked :class:`HubPlan`; nothing downloaded yet).

    Args:
        name_or_path: hub id, local diffusers folder or ``preset:<name>``.
        revision: hub branch, tag or commit.
        variant: weight variant (``fp16``).
        cache_dir: hub cache folder (``None``: ``HF_HOME``'s); presets are built under it too.
        config_key: the config key that names the model, for messages.
    """
    if name_or_path.startswith(PRESET_PREFIX):
        return materialize_preset(name_or_path[len(PRESET_PREFIX) :], cache_dir)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file() and not all((local / c).is_dir() for c in COMPONENTS):
            raise BackboneUnavailableError(
                f"'{local}' is a folder but not a diffusers Stable Diffusion folder: it needs {list(COMPONENTS)}"
            )
        return local
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise BackboneUnavailableError(f"local model folder '{name_or_path}' does not exist")
    return plan_files(
        name_or_path,
        backbone_wants(variant),
        revision=revision,
        cache_dir=cache_dir,
        what="Stable Diffusion weights",
        config_key=config_key,
        error=BackboneUnavailableError,
    )


def resolve_model_folder(
    name_or_path: str, revision: str | None = None, variant: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """Turn a preset name, local folder or hub id into a local diffusers folder (downloading what is needed).

    Args:
        name_or_path: hub id, local diffusers folder or ``preset:<name>``.
        revision: hub branch, tag or commit.
        variant: weight variant (``fp16``).
        cache_dir: where hub downloads go (default the hub's cache).
    """
    source = backbone_source(name_or_path, revision, variant, cache_dir)
    return source.fetch() if isinstance(source, HubPlan) else source


def controlnet_source(
    name_or_path: str,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    config_key: str = "controlnet",
) -> Path | HubPlan:
    """Like :func:`backbone_source`, for a ControlNet (``preset:tiny-controlnet-<seed>``, folder or hub id).

    Args:
        name_or_path: hub id, local diffusers folder or ``preset:<name>``.
        revision: hub branch, tag or commit.
        variant: weight variant (``fp16``).
        cache_dir: where hub downloads go (default the hub's cache).
        config_key: the config key that names it, for errors.
    """
    if name_or_path.startswith(PRESET_PREFIX):
        return materialize_preset(name_or_path[len(PRESET_PREFIX) :], cache_dir)
    if Path(name_or_path).expanduser().is_dir():
        return Path(name_or_path).expanduser()
    return plan_files(
        name_or_path,
        controlnet_wants(variant),
        revision=revision,
        cache_dir=cache_dir,
        what="ControlNet weights",
        config_key=config_key,
        error=BackboneUnavailableError,
    )


def load_controlnet(
    name_or_path: str,
    weight_dtype: str | torch.dtype = "fp32",
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    config_key: str = "controlnet",
) -> nn.Module:
    """A frozen ``ControlNetModel`` from a hub id, a local folder or ``preset:tiny-controlnet-<seed>``.

    Hub repositories are read in the format they have: ``diffusion_pytorch_model.safetensors`` where present, else
    the ``.bin`` file (loaded by diffusers with ``weights_only=True``).

    Args:
        name_or_path: hub id, local folder or preset.
        weight_dtype: dtype of the frozen weights.
        variant: weight variant (``fp16``).
        revision: hub branch, tag or commit.
        cache_dir: hub cache folder.
        config_key: the config key that names it, for messages.
    """
    from diffusers import ControlNetModel

    source = controlnet_source(name_or_path, variant, revision, cache_dir, config_key)
    folder = source.fetch() if isinstance(source, HubPlan) else source
    kwargs = {"variant": variant} if variant else {}
    controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=parse_dtype(weight_dtype), **kwargs)
    return controlnet.requires_grad_(False).eval()


def load_frozen_backbone(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    weight_dtype: str | torch.dtype = "fp32",
    cache_dir: str | Path | None = None,
    with_unet: bool = True,
) -> FrozenBackbone:
    """Load the components from one folder, frozen (``requires_grad=False``, eval) in ``weight_dtype``.

    ``with_unet=False`` skips the UNet (latent caching needs only the VAE and the text encoder).

    Args:
        pretrained_model_name_or_path: hub id, local diffusers folder or ``preset:<name>``.
        revision: hub branch, tag or commit.
        variant: weight variant (``fp16``).
        weight_dtype: the frozen weights' dtype (``fp32``, ``bf16``, ``fp16``).
        cache_dir: where hub downloads go.
        with_unet: load the UNet too.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = resolve_model_folder(pretrained_model_name_or_path, revision, variant, cache_dir)
    dtype = parse_dtype(weight_dtype)
    load_kwargs = {"variant": variant} if variant else {}
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise BackboneUnavailableError(
            f"tokenizer in '{folder}/tokenizer' has {len(tokenizer)} tokens, expected the CLIP vocabulary of "
            f"{CLIP_VOCAB_SIZE}: its vocab.json/merges.txt (or tokenizer.json) are missing or broken"
        )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **load_kwargs)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, **load_kwargs)
    unet = (
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **load_kwargs)
        if with_unet
        else None
    )
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if unet is not None and unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise BackboneUnavailableError(
            f"'{folder}': unet.cross_attention_dim={unet.config.cross_attention_dim} does not match "
            f"text_encoder.hidden_size={text_encoder.config.hidden_size}"
        )
    for module in (m for m in (vae, text_encoder, unet) if m is not None):
        module.requires_grad_(False)
        module.eval()
    return FrozenBackbone(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        noise_scheduler=noise_scheduler,
        name=pretrained_model_name_or_path,
        source=folder,
    )
