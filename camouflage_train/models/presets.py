"""Random-weight Stable Diffusion stand-ins, saved in the diffusers format.

A preset is written once to ``<cache_dir>/<name>`` (atomically: built in a temporary folder, then
renamed) and then loaded through exactly the same ``from_pretrained`` calls as the real SD 1.5.
The tokenizer is the real CLIP BPE vocabulary that open_clip ships, so prompts tokenize as in SD 1.5.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

PRESET_PREFIX = "preset:"
CLIP_VOCAB_SIZE = 49408
_FORMAT_VERSION = "1"


def write_clip_tokenizer(folder: Path) -> None:
    """Write SD 1.5's tokenizer files (``vocab.json``, ``merges.txt``) from open_clip's shipped BPE merges."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the slice the original CLIP tokenizer uses
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_tiny(folder: Path) -> None:
    """A ~4 M parameter SD-1.5-shaped model: VAE downsamples x2, UNet has 6 cross-attention layers."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=32,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")


PRESETS: dict[str, Callable[[Path], None]] = {"tiny": build_tiny}


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAMOUFLAGE_CACHE", Path.home() / ".cache" / "camouflage_train"))


def materialize_preset(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the diffusers folder of preset ``name``, building it on first use."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; available: {sorted(PRESETS)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-v{_FORMAT_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        PRESETS[name](staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
