"""Load the frozen Stable Diffusion components (VAE, text encoder, tokenizer, UNet, noise scheduler).

``pretrained_model_name_or_path`` is a hub id, a local diffusers folder, or ``preset:<name>`` for the
random-weight stand-ins in :mod:`camouflage_train.models.presets`. Hub ids are resolved with one
``snapshot_download`` restricted to the five components (safetensors only), so an offline machine
fails in well under a second with a message saying how to supply a local copy, instead of retrying
per file or, worse, returning transformers' silent 2-token dummy tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from camouflage_train.errors import UserError
from camouflage_train.models.presets import CLIP_VOCAB_SIZE, PRESET_PREFIX, materialize_preset

COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class BackboneUnavailableError(UserError, OSError):
    """The Stable Diffusion weights cannot be found locally or downloaded."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{name}'; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class FrozenBackbone:
    """The frozen SD components; ``source`` is the local folder they were read from."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    unet: nn.Module | None
    noise_scheduler: object
    name: str
    source: Path

    def modules(self) -> dict[str, nn.Module]:
        found = {"vae": self.vae, "text_encoder": self.text_encoder, "unet": self.unet}
        return {name: module for name, module in found.items() if module is not None}


def _hub_patterns(variant: str | None) -> list[str]:
    suffix = f".{variant}" if variant else ""
    patterns = ["model_index.json"]
    for sub in COMPONENTS:
        patterns += [f"{sub}/*.json", f"{sub}/*.txt"]
    patterns += [
        f"vae/diffusion_pytorch_model{suffix}.safetensors",
        f"unet/diffusion_pytorch_model{suffix}.safetensors",
    ]
    patterns += [f"text_encoder/model{suffix}.safetensors"]
    return patterns


def resolve_model_folder(
    name_or_path: str, revision: str | None = None, variant: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """Turn a preset name, local folder or hub id into a local diffusers folder."""
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
    return download_snapshot(
        name_or_path,
        revision,
        _hub_patterns(variant),
        "Stable Diffusion weights",
        "model.backbone.pretrained_model_name_or_path",
    )


def download_snapshot(repo_id: str, revision: str | None, patterns: list[str], what: str, config_key: str) -> Path:
    """``snapshot_download`` of just ``patterns``; offline or missing -> a clear error within seconds."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        include = " ".join(f"'{p}'" for p in patterns)
        raise BackboneUnavailableError(
            f"Cannot load {what} '{repo_id}' (revision={revision}): it is not in the Hugging Face cache and could "
            f"not be downloaded ({type(err).__name__}: {str(err).splitlines()[0]}). On a machine with internet run "
            f"`hf download {repo_id} --include {include} --local-dir <folder>`, then pass "
            f"{config_key}=<folder> (or point HF_HOME at a cache that has it)."
        ) from err


def load_controlnet(
    name_or_path: str,
    weight_dtype: str | torch.dtype = "fp32",
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    config_key: str = "controlnet",
) -> nn.Module:
    """A frozen ``ControlNetModel`` from a hub id, a local folder or ``preset:tiny-controlnet-<seed>``."""
    from diffusers import ControlNetModel

    if name_or_path.startswith(PRESET_PREFIX):
        folder = materialize_preset(name_or_path[len(PRESET_PREFIX) :], cache_dir)
    elif Path(name_or_path).expanduser().is_dir():
        folder = Path(name_or_path).expanduser()
    else:
        suffix = f".{variant}" if variant else ""
        folder = download_snapshot(
            name_or_path,
            revision,
            ["config.json", f"diffusion_pytorch_model{suffix}.safetensors"],
            "ControlNet weights",
            config_key,
        )
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
