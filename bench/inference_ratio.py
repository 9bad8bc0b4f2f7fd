"""Seconds per image of CAMOUFLaGE-Light vs -Base, each at its operating point, in one process.

    python bench/inference_ratio.py --preset mini --resolution 64 --structure-controlnets 1   # the mini world, CPU
    python bench/inference_ratio.py --preset sd15-shape --resolution 512 --device cuda --dtype bf16

Each method samples as its config says (``--base-config``/``--light-config``; by default
``configs/anonymize/model/{base,light}_mini.yaml`` for ``--preset mini``, ``*_tiny.yaml`` for tiny and
``{base,light}.yaml`` for SD 1.5 shapes): steps, classifier-free guidance, Base's img2img ``strength`` and
anonymization branch, Light's sampler and ``keep_background``. ``--steps N`` instead runs both from noise with N
DDIM steps (the equal-steps comparison). Base = ``--structure-controlnets`` structure ControlNets (the paper's
default set: 5; the miniature world's Base has 1) + the reconstruction branch; Light = the adapter, no ControlNet.
Models have random weights in the real architectures (speed does not depend on weight values), Light's adapter
too. Ends with one JSON line; the paper reports Light at about half of Base's time on SD 1.5.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

from bench.common import adapter_config, emit, timed
from camouflage_train.data.dataset import PersonImageDataset, collate_skipping
from camouflage_train.data.schema import AttributeSchema
from camouflage_train.data.sources import SyntheticSource
from camouflage_train.models.attribute_encoder import AttributeEncoder
from camouflage_train.models.backbone import load_frozen_backbone
from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.models.ip_adapter import AdapterConfig, initial_state_dict, install_ip_adapter
from camouflage_train.pipelines.base import CamouflageBase, build_controls
from camouflage_train.pipelines.controls import CannyEdges, SobelLines
from camouflage_train.pipelines.light import CamouflageLight

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


CONFIGS = REPO / "configs" / "anonymize" / "model"
SUFFIX = {"mini": "_mini", "tiny": "_tiny", "sd15-shape": ""}
BASE_KEYS = ("guidance_scale", "num_inference_steps", "strength", "anonymization")
LIGHT_KEYS = ("guidance_scale", "num_inference_steps", "scheduler", "keep_background")


def operating_points(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Base's and Light's sampling settings: from their model configs, or both from noise with ``--steps``."""
    from omegaconf import OmegaConf

    suffix = SUFFIX.get(args.preset, "")
    base_cfg = OmegaConf.load(args.base_config or CONFIGS / f"base{suffix}.yaml")
    light_cfg = OmegaConf.load(args.light_config or CONFIGS / f"light{suffix}.yaml")
    base_values, light_values = (OmegaConf.to_container(c, resolve=False) for c in (base_cfg, light_cfg))
    base = {key: base_values.get(key) for key in BASE_KEYS}
    light = {key: light_values.get(key) for key in LIGHT_KEYS}
    base["anonymization"] = {k: v for k, v in (base["anonymization"] or {}).items() if k != "model"}
    base["anonymization"]["enabled"] = True
    light["keep_background"] = bool(light.get("keep_background"))
    if args.steps is not None:  # the equal-steps comparison: both from noise, DDIM
        base.update(num_inference_steps=args.steps, strength=None)
        light.update(num_inference_steps=args.steps, scheduler=None, keep_background=False)
    return base, light


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="both from noise with N DDIM steps (default: configs)")
    parser.add_argument("--base-config", type=Path, default=None, help="Base's sampling settings (a model config)")
    parser.add_argument("--light-config", type=Path, default=None, help="Light's sampling settings (a model config)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="tiny", help="tiny, mini (the trained miniature world) or sd15-shape")
    parser.add_argument(
        "--structure-controlnets", type=int, default=5, help="Base's structure ControlNets (paper: 5; eval_demo: 1)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="frozen weights: fp32, bf16 or fp16")
    parser.add_argument("--autocast", action="store_true", help="run under autocast instead of natively in --dtype")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    args = parser.parse_args()
    device = torch.device(args.device)
    schema = AttributeSchema.from_config(yaml.safe_load((REPO / "configs/attributes/face.yaml").read_text()))
    source = SyntheticSource(schema.to_config(), args.batch, args.resolution)
    dataset = PersonImageDataset(source, schema, args.resolution)
    batch = collate_skipping([dataset[i] for i in range(args.batch)])
    images = [TF.to_pil_image((p + 1) / 2) for p in batch["pixel_values"]]
    seeds, prompts = list(range(args.batch)), list(batch["caption"])

    preprocessors = (CannyEdges(), SobelLines())
    specs = {
        f"cn{i}": {"model": f"preset:{args.preset}-controlnet-{i}", "preprocessor": preprocessors[i % 2]}
        for i in range(1, args.structure_controlnets + 1)
    }
    base_point, light_point = operating_points(args)
    recon = {**base_point["anonymization"], "model": f"preset:{args.preset}-controlnet-0"}
    base = CamouflageBase(
        load_frozen_backbone(f"preset:{args.preset}", weight_dtype=args.dtype),
        build_controls(specs, args.dtype, None),
        recon,
        guidance_scale=base_point["guidance_scale"],
        num_inference_steps=base_point["num_inference_steps"],
        strength=base_point["strength"],
    ).to(device)
    backbone = load_frozen_backbone(f"preset:{args.preset}", weight_dtype=args.dtype)
    config = AdapterConfig(**adapter_config(args.preset))
    install_ip_adapter(backbone.unet, initial_state_dict(backbone.unet, config))
    encoder = AttributeEncoder.from_adapter_config(schema.to_config(), config)
    light = CamouflageLight(
        backbone,
        encoder,
        config,
        guidance_scale=light_point["guidance_scale"],
        num_inference_steps=light_point["num_inference_steps"],
        scheduler=light_point["scheduler"],
        keep_background=light_point["keep_background"],
    ).to(device)
    persons = PersonBatch.from_batch(batch)

    def run(fn: Any) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=args.autocast):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def per_image(fn: Any) -> float:
        run(fn)  # warm-up
        return timed(lambda: run(fn), args.repeats, device) / args.batch

    base_s = per_image(lambda: base(images, persons, seeds, prompts))
    light_s = per_image(lambda: light(images, persons, seeds, prompts))
    emit(
        {
            "preset": args.preset,
            "device": str(device),
            "dtype": args.dtype,
            "autocast": args.autocast,
            "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "resolution": args.resolution,
            "operating_points": {"base": base_point, "light": light_point},
            "batch": args.batch,
            "structure_controlnets": args.structure_controlnets,
            "base_s_per_image": round(base_s, 4),
            "light_s_per_image": round(light_s, 4),
            "light_over_base": round(light_s / base_s, 3),
            "threads": torch.get_num_threads(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
