"""Build the miniature world: ``python -m camouflage_train.miniworld.build [--part PART] [--seed 0]``.

Each part is trained from scratch with the given seed and written atomically into ``--out`` (default: the
committed ``camouflage_train/miniworld/weights``). ``--steps-scale`` shrinks every step count (tests build a
few-step world with it). CPU by default; ``--device cuda`` trains the base (the expensive part) on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

from camouflage_train.miniworld import WEIGHTS
from camouflage_train.utils.atomic import atomic_folder

# In build order: the ControlNets are trained on the base.
PARTS = ["base", "faces", "features", "person", "controlnet_canny", "controlnet_recon"]


def _scaled(cfg, scale: float):
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for name, value in fields.items():
        if name.endswith("_steps") and name != "warmup_steps" and isinstance(value, int):
            fields[name] = max(1, round(value * scale))
    if "warmup_steps" in fields:
        fields["warmup_steps"] = max(1, min(fields["warmup_steps"], round(fields["warmup_steps"] * scale)))
    return type(cfg)(**fields)


def main(argv: list[str] | None = None) -> int:
    """``python -m camouflage_train.miniworld.build``: build one part of the miniature world, or all; returns the exit
    status.

    Args:
        argv: the command line (default ``sys.argv``).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (tests: 0.01)")
    parser.add_argument(
        "--num-scenes",
        type=int,
        default=None,
        help="scenes per part and per held-out check (default: each one's)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument(
        "--init-from", default=None, help="base: continue from this mini base folder (keeps its autoencoder)"
    )
    parser.add_argument("--device", default="cpu", help="the base's device, e.g. cuda (the face pack trains on CPU)")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    from camouflage_train.miniworld.base_model import BaseBuildConfig, build_mini_base
    from camouflage_train.miniworld.controlnets import ControlNetBuildConfig, build_mini_controlnet
    from camouflage_train.miniworld.face_pack import FaceBuildConfig, build_mini_face_pack, build_scene_features
    from camouflage_train.miniworld.person_features import PersonBuildConfig, build_person_features

    parts = {
        "base": (BaseBuildConfig, build_mini_base),
        "faces": (FaceBuildConfig, build_mini_face_pack),
        "features": (FaceBuildConfig, build_scene_features),
        "person": (PersonBuildConfig, build_person_features),
        **{
            name: (ControlNetBuildConfig, functools.partial(build_mini_controlnet, part=name))
            for name in ("controlnet_canny", "controlnet_recon")
        },
    }
    assert list(parts) == PARTS
    for part, (config_class, build) in parts.items():
        if args.part not in (part, "all"):
            continue
        cfg = _scaled(config_class(seed=args.seed, threads=args.threads), args.steps_scale)
        changes = {
            "num_scenes": args.num_scenes,
            "num_identities": args.num_scenes,
            "device": args.device,
            "init_from": args.init_from,
        }
        if args.out.resolve() != WEIGHTS.resolve() and (args.out / "base" / "model_index.json").is_file():
            changes["base"] = str(args.out / "base")  # ControlNets follow the base built next to them
        known = {f.name for f in dataclasses.fields(cfg)}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in known and v is not None})
        with atomic_folder(args.out / part, replace=True) as staging:  # a failed build leaves the old one
            metrics = build(staging, cfg, log)
            if part == "faces":  # measured on held-out scenes through insightface, recorded with the build
                from camouflage_train.miniworld.checks import face_pack_report

                held_out = {"num_scenes": args.num_scenes, "num_identities": args.num_scenes} if args.num_scenes else {}
                metrics["held_out"] = face_pack_report(staging, base=cfg.base, **held_out)
                (staging / "build.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
                log(f"face pack on held-out scenes: {json.dumps(metrics['held_out'])}")
        log(f"wrote {args.out / part}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
