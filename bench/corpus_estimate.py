"""On paper: what annotating, caching, training and anonymizing a large corpus costs on N GPUs, from measured rows.

    python bench/corpus_estimate.py                                    # 50M images, 8 and 64 GPUs, the H200 rows
    python bench/corpus_estimate.py --images 70000 --gpus 1 8 --epochs 20

Measured (read from ``--gpu-suite``, a ``bench/gpu_suite.py`` JSON line): the training step's images/s online and
from the latent cache, and Light's and Base's seconds per image. Derived: the latent cache's encoding rate, from the
online and the cached step at the same batch (the online step runs the VAE and text encoders forward only, so
their time is the difference). Assumed, and printed as such: the annotation rate per GPU (insightface on
onnxruntime-gpu was not measured here), the stored size of an image, linear scaling over GPUs (the adapter's
gradients are 94 MB per all-reduce, a few ms on NVLink or InfiniBand against steps of a few tenths of a second), and
Light at fewer steps costing in proportion to its steps. The storage sizes of the latents are exact for SD 1.5 at
512² (the arrays ``make_shards.py latents=true`` stores). Prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, emit

# What make_shards.py latents=true stores per image and flip variant for SD 1.5 at 512²: VAE mean and std
# (4 x 64 x 64, fp16), the caption's CLIP-L text embedding (77 x 768, fp16), the person arrays (4 persons: face box,
# extent, 4 continuous and 1 categorical attributes in fp32/int64, mask, dropped count: under a kilobyte).
LATENT_BYTES = 2 * 4 * 64 * 64 * 2
TEXT_BYTES = 77 * 768 * 2
PERSON_BYTES = 4 * (4 + 4 + 4) * 4 + 4 * 8 + 4 + 8
# A sidecar row of annotate.py with a few persons (boxes, attributes, keypoints as JSON text): about this size.
SIDECAR_ROW_BYTES = 1000


def rows_of(suite: dict) -> dict[str, float]:
    """images/s of the training step (online at the largest batch, online and cached at the same batch) and
    s/image of inference, from a gpu_suite JSON line."""
    rows = suite["train_step"]["rows"]
    online = {r["batch_size"]: r["images_per_s"] for r in rows if r["mode"] == "bf16" and "images_per_s" in r}
    cached = {r["batch_size"]: r["images_per_s"] for r in rows if r["mode"] == "bf16-cached" and "images_per_s" in r}
    both = sorted(set(online) & set(cached))
    if not both:
        raise SystemExit("the gpu_suite line has no bf16 and bf16-cached rows at one batch size")
    batch = both[-1]
    encode_s = batch / online[batch] - batch / cached[batch]
    return {
        "train_online": online[max(online)],
        "train_online_batch": max(online),
        "train_cached": cached[batch],
        "cache_batch": batch,
        "cache_encode": batch / encode_s,
        "light_s": suite["inference"]["light_s_per_image"],
        "base_s": suite["inference"]["base_s_per_image"],
        "steps": suite["inference"]["steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=float, default=50e6)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--epochs", type=float, default=1.0, help="training passes over the corpus")
    parser.add_argument(
        "--gpu-suite", type=Path, default=REPO / "bench/results/2026-11-27_h200_gpu_suite_sd15-shape_512.json"
    )
    parser.add_argument("--annotate-per-gpu", type=float, default=300.0, help="ASSUMED images/s of annotate.py per GPU")
    parser.add_argument("--image-kb", type=float, default=60.0, help="ASSUMED stored size of one image (JPEG, 512 px)")
    parser.add_argument("--light-steps", type=int, nargs="+", default=[25, 4])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    suite = json.loads(args.gpu_suite.read_text().strip().splitlines()[-1])
    rate = rows_of(suite)
    n = args.images
    per_image_latents = 2 * (LATENT_BYTES + TEXT_BYTES + PERSON_BYTES)  # both flip variants
    stages = [
        ("annotate (assumed rate)", n / args.annotate_per_gpu, n * SIDECAR_ROW_BYTES / 1e12, "assumed"),
        ("make_shards, images only (CPU)", 0.0, n * args.image_kb * 1e3 / 1e12, "bytes copied"),
        # both flip variants are encoded (and stored)
        ("make_shards latents=true", 2 * n / rate["cache_encode"], n * per_image_latents / 1e12, "derived"),
        (f"train {args.epochs:g} epoch(s), online (batch {rate['train_online_batch']})",
         args.epochs * n / rate["train_online"], 0.0, "measured"),
        (f"train {args.epochs:g} epoch(s), from the cache (batch {rate['cache_batch']})",
         args.epochs * n / rate["train_cached"], 0.0, "measured"),
    ]  # fmt: skip
    for steps in args.light_steps:
        seconds = rate["light_s"] * steps / rate["steps"]
        kind = "measured" if steps == rate["steps"] else "scaled by steps"
        stages.append((f"anonymize, Light {steps} steps", n * seconds, n * args.image_kb * 1e3 / 1e12, kind))
    stages.append((f"anonymize, Base {rate['steps']} steps", n * rate["base_s"], n * args.image_kb * 1e3 / 1e12,
                   "measured"))  # fmt: skip
    header = "| stage | GPU-hours | " + " | ".join(f"{g} GPUs (h)" for g in args.gpus) + " | storage (TB) | rate |"
    print(f"{n:,.0f} images; rates from {suite['device']} ({args.gpu_suite.name})\n")
    print(header)
    print("|---|---:|" + "---:|" * len(args.gpus) + "---:|---|")
    table = []
    for name, gpu_seconds, terabytes, kind in stages:
        hours = gpu_seconds / 3600
        cells = " | ".join(f"{hours / g:,.1f}" for g in args.gpus)
        print(f"| {name} | {hours:,.0f} | {cells} | {terabytes:,.1f} | {kind} |")
        table.append({"stage": name, "gpu_hours": round(hours, 1), "terabytes": round(terabytes, 2), "rate": kind})
    streamed = {
        f"{g}_gpus_online_MB_per_s": round(g * rate["train_online"] * args.image_kb / 1e3, 1) for g in args.gpus
    } | {
        # an item holds both flip variants and the image: all of it is read
        f"{g}_gpus_cached_MB_per_s": round(
            g * rate["train_cached"] * (per_image_latents + args.image_kb * 1e3) / 1e6, 1
        )
        for g in args.gpus
    }
    print(f"\nread from the object store while training: {streamed}")
    emit({"benchmark": "corpus_estimate", "images": n, "gpus": args.gpus, "rates": rate, "stages": table,
          "stream_MB_per_s": streamed, "latent_bytes_per_image": per_image_latents}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
