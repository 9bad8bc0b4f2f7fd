"""Random-weight Stable Diffusion stand-ins, saved in the diffusers format.

Presets are component configs kept as data (``models/configs/<name>/*.json``). A preset is written
once to ``<cache_dir>/<name>`` (atomically: built in a temporary folder, then renamed) and then loaded
through exactly the same ``from_pretrained`` calls as the real SD 1.5.
The tokenizer is the real CLIP BPE vocabulary that open_clip ships, so prompts tokenize as in SD 1.5.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from camouflage_train.utils.atomic import atomic_folder

PRESET_PREFIX = "preset:"
CLIP_VOCAB_SIZE = 49408
_FORMAT_VERSION = "2"


def write_clip_tokenizer(folder: Path) -> None:
    """Write SD 1.5's tokenizer files (``vocab.json``, ``merges.txt``) from open_clip's shipped BPE merges.

    Args:
        folder: the tokenizer folder to write.
    """
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


CONFIG_ROOT = Path(__file__).parent / "configs"


def write_model_index(folder: Path, scheduler_class: str) -> None:
    """``model_index.json`` of a ``StableDiffusionPipeline`` without safety checker or image encoder.

    Args:
        folder: the pipeline folder.
        scheduler_class: the noise scheduler's class name.
    """
    import diffusers

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")


def build_from_configs(config_dir: Path, folder: Path, seed: int = 0) -> None:
    """Instantiate random weights from the component configs in ``config_dir`` and save a diffusers folder.

    Args:
        config_dir: the preset's component configs.
        folder: the pipeline folder to write.
        seed: the random weights' seed.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    def read(name: str) -> dict:
        return json.loads((config_dir / f"{name}.json").read_text(encoding="utf-8"))

    torch.manual_seed(seed)
    for name in ("unet", "vae"):
        config = read(name)
        getattr(diffusers, config["_class_name"]).from_config(config).save_pretrained(folder / name)
    CLIPTextModel(CLIPTextConfig.from_dict(read("text_encoder"))).save_pretrained(folder / "text_encoder")
    scheduler = read("scheduler")
    getattr(diffusers, scheduler["_class_name"]).from_config(scheduler).save_pretrained(folder / "scheduler")
    write_clip_tokenizer(folder / "tokenizer")
    write_model_index(folder, scheduler["_class_name"])


# name -> folder of component configs. `tiny`: ~4 M parameters, VAE downsamples x2, 6 cross-attention layers.
# `sd15-shape`: the exact SD 1.5 architecture (UNet 860 M, VAE 84 M, CLIP-L text 123 M) with random weights.
PRESETS: dict[str, Path] = {"tiny": CONFIG_ROOT / "tiny", "sd15-shape": CONFIG_ROOT / "sd15"}
# name -> folder of *trained* weights committed with the package. `mini`: the miniature world's base
# (camouflage_train/miniworld), ~10 M parameters at 64x64, trained on synthetic scenes; `mini-canny` and
# `mini-recon`: Base's Canny-edge and reconstruction ControlNets trained on it.
MINI_WEIGHTS = Path(__file__).resolve().parents[1] / "miniworld" / "weights"
MINI_BUILD_COMMAND = "python -m camouflage_train.miniworld.build"
TRAINED_PRESETS: dict[str, str] = {"mini": "base", "mini-canny": "controlnet_canny", "mini-recon": "controlnet_recon"}


# What a stand-in is, for the warnings and result flags that say so.
RANDOM_WEIGHTS = "random weights (a test stand-in): what it makes or measures means nothing"
MINI_WORLD = "built for the synthetic mini world: on photographs it finds and draws nothing meaningful"
_STAND_IN_TARGETS = {"camouflage_train.stand_ins.": RANDOM_WEIGHTS, "camouflage_train.miniworld.": MINI_WORLD}


def stand_in_kind(value: str) -> str | None:
    """:data:`RANDOM_WEIGHTS` or :data:`MINI_WORLD` when ``value`` (a model id or a ``_target_``) names one of the
    project's stand-ins; ``None`` for anything else (a hub id, a folder, a real model). Which keys of a run's config
    name one: :func:`camouflage_train.pipelines.stand_ins.find_stand_ins`.

    Args:
        value: a config value.
    """
    if value.startswith(PRESET_PREFIX):
        name = value.removeprefix(PRESET_PREFIX)
        return MINI_WORLD if name in TRAINED_PRESETS else RANDOM_WEIGHTS
    return next((kind for prefix, kind in _STAND_IN_TARGETS.items() if value.startswith(prefix)), None)


def mini_weights_folder(part: str) -> Path:
    """The committed folder of one built part of the miniature world (``base``, ``faces``, ``features``, ...);
    a clear error when it is absent.

    Args:
        part: the sub-folder of ``camouflage_train/miniworld/weights``.
    """
    folder = MINI_WEIGHTS / part
    if not (folder / "build.json").is_file():
        raise FileNotFoundError(
            f"the miniature world's '{part}' is missing from {folder}: restore it from git or rebuild it with "
            f"`{MINI_BUILD_COMMAND} --part {part}`"
        )
    return folder


def default_cache_dir() -> Path:
    """Where built presets go: ``$CAMOUFLAGE_CACHE``, else ``~/.cache/camouflage_train``."""
    return Path(os.environ.get("CAMOUFLAGE_CACHE", Path.home() / ".cache" / "camouflage_train"))


def build_preset_controlnet(folder: Path, base: str, seed: int, cache_dir: str | Path | None = None) -> None:
    """A ControlNet for preset ``base``'s UNet whose output convolutions are random, not zero (so it acts).

    Args:
        folder: the folder to write.
        base: the preset whose UNet it is built from.
        seed: the random output convolutions' seed.
        cache_dir: where the base preset is built.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(materialize_preset(base, cache_dir), subfolder="unet")
    # The conditioning embedding must downsample like the VAE: x2 for tiny, x4 for mini, x8 for SD 1.5.
    channels = {"tiny": (16, 32), "mini": (16, 32, 64)}.get(base, (16, 32, 96, 256))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    controlnet.save_pretrained(folder)


def materialize_preset(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the folder of preset ``name`` (``tiny``, ``sd15-shape``, ``mini``, ``<one of them>-controlnet-<seed>``),
    building random-weight ones on first use.

    Args:
        name: the preset.
        cache_dir: where random-weight presets are built (default :func:`default_cache_dir`).
    """
    if name in TRAINED_PRESETS:
        return mini_weights_folder(TRAINED_PRESETS[name])
    base, _, seed = name.rpartition("-controlnet-")
    if (base in PRESETS or base in TRAINED_PRESETS) and seed.isdigit():
        return _materialize(
            name, cache_dir, "config.json", lambda folder: build_preset_controlnet(folder, base, int(seed), cache_dir)
        )
    if name not in PRESETS:
        available = sorted([*PRESETS, *TRAINED_PRESETS])
        raise ValueError(f"unknown model preset '{name}'; available: {available} or <preset>-controlnet-<seed>")
    return _materialize(name, cache_dir, "model_index.json", lambda folder: build_from_configs(PRESETS[name], folder))


def _materialize(name: str, cache_dir: str | Path | None, marker: str, build: Callable[[Path], None]) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-v{_FORMAT_VERSION}"
    if not (target / marker).is_file():
        with atomic_folder(target) as staging:  # a concurrent builder's identical copy may win
            build(staging)
    return target
