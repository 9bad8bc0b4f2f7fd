"""Light training-step throughput and memory across the speed/memory options, ratios from one run.

    python bench/train_step.py                                                  # tiny preset, 64², CPU
    python bench/train_step.py --preset sd15-shape --resolution 256 --batch-sizes 2 --steps 3 \\
        --modes fp32 fp32-cached bf16-autocast bf16 bf16-ckpt                   # SD 1.5 shapes on CPU
    python bench/train_step.py --preset sd15-shape --resolution 512 --device cuda --batch-sizes 16

Each (mode, batch size) runs in a fresh subprocess (clean peak-memory counters, no compile cache shared):
build the module on ``preset:<preset>`` (the real architecture, random weights), prefetch a few batches
of synthetic scenes through the real data path (``cached``: through the real latent cache), warm up,
count FLOPs of one step with ``torch.utils.flop_counter``, then time ``--steps`` steps of
loss + backward + AdamW. Images/s, peak memory (CUDA: allocator peak; CPU: resident set sampled every
2 ms during the timed steps), TFLOP/step and, on a known GPU, MFU. Ends with one JSON line: every row and
the ratios between modes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    REPO,
    ResidentPeak,
    build_module,
    card_name,
    count_flops,
    datamodule,
    emit,
    peak_tflops,
    saved_activation_bytes,
    sync,
    timed,
    to_device,
    train_step,
)


@dataclass(frozen=True)
class Mode:
    """One combination of the training-speed options (``LightAdapterModule`` flags plus data and attention)."""

    dtype: str = "bf16"
    cached: bool = False
    frozen_autocast: bool = False
    gradient_checkpointing: bool | str = False  # False, True (every block) or "high_res"
    attention: str = "sdpa"
    channels_last: bool = False
    compile_unet: bool | str = False  # False, "blocks" (regional) or True (whole UNet)
    compile_mode: str | None = None  # torch.compile's mode: "reduce-overhead" captures CUDA graphs
    batched_person_attention: bool = True
    fused_adamw: bool = False  # torch's single-kernel AdamW (fused=True) instead of its default foreach one


MODES = {
    "fp32": Mode(dtype="fp32"),
    "fp32-cached": Mode(dtype="fp32", cached=True),
    "bf16-autocast": Mode(frozen_autocast=True),
    "bf16": Mode(),
    "bf16-cached": Mode(cached=True),
    "bf16-ckpt": Mode(gradient_checkpointing=True),
    "bf16-ckpt-high-res": Mode(gradient_checkpointing="high_res"),
    "bf16-eager-attention": Mode(attention="eager"),
    "bf16-channels-last": Mode(channels_last=True),
    "bf16-compile": Mode(compile_unet=True),
    "bf16-compile-blocks": Mode(compile_unet="blocks"),
    "bf16-person-loop": Mode(batched_person_attention=False),
    "bf16-fused-adamw": Mode(fused_adamw=True),
    "fp16": Mode(dtype="fp16"),
    # channels_last measured slower on an H200 (2026-11-26): left out until a GPU run says otherwise.
    "fastest": Mode(cached=True, compile_unet="blocks"),
    # The adapter step has static shapes (persons padded to max_persons): the whole cached step in CUDA graphs.
    "bf16-cudagraphs": Mode(cached=True, compile_unet=True, compile_mode="reduce-overhead"),
}

# (ratio name, numerator mode, denominator mode, row field)
RATIOS = (
    ("cached_over_online_fp32", "fp32-cached", "fp32", "images_per_s"),
    ("cached_over_online_bf16", "bf16-cached", "bf16", "images_per_s"),
    ("bf16_native_over_autocast", "bf16", "bf16-autocast", "images_per_s"),
    ("bf16_over_fp32", "bf16", "fp32", "images_per_s"),
    ("fp16_over_bf16", "fp16", "bf16", "images_per_s"),
    ("sdpa_over_eager_attention", "bf16", "bf16-eager-attention", "images_per_s"),
    ("channels_last_over_default", "bf16-channels-last", "bf16", "images_per_s"),
    ("compile_over_eager", "bf16-compile", "bf16", "images_per_s"),
    ("compile_blocks_over_eager", "bf16-compile-blocks", "bf16", "images_per_s"),
    ("fastest_over_bf16", "fastest", "bf16", "images_per_s"),
    ("cudagraphs_over_fastest", "bf16-cudagraphs", "fastest", "images_per_s"),
    ("batched_persons_over_loop", "bf16", "bf16-person-loop", "images_per_s"),
    ("fused_adamw_over_foreach", "bf16-fused-adamw", "bf16", "images_per_s"),
    ("memory_bf16_ckpt_over_fp32", "bf16-ckpt", "fp32", "peak_mem_gib"),
    ("memory_bf16_over_fp32", "bf16", "fp32", "peak_mem_gib"),
    ("memory_bf16_ckpt_over_bf16", "bf16-ckpt", "bf16", "peak_mem_gib"),
    ("memory_ckpt_high_res_over_bf16", "bf16-ckpt-high-res", "bf16", "peak_mem_gib"),
    ("ckpt_high_res_over_bf16", "bf16-ckpt-high-res", "bf16", "images_per_s"),
    ("ckpt_over_bf16", "bf16-ckpt", "bf16", "images_per_s"),
    ("saved_activations_ckpt_over_bf16", "bf16-ckpt", "bf16", "saved_activations_gib"),
    ("saved_activations_ckpt_high_res_over_bf16", "bf16-ckpt-high-res", "bf16", "saved_activations_gib"),
)


def use_eager_attention(unet: torch.nn.Module) -> None:
    """Swap every SDPA processor for diffusers' matmul-softmax one, keeping the adapter's weights."""
    from diffusers.models.attention_processor import AttnProcessor, IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    processors: dict[str, Any] = {}
    for name, processor in unet.attn_processors.items():
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            eager = IPAdapterAttnProcessor(
                processor.hidden_size, processor.cross_attention_dim, processor.num_tokens, processor.scale
            )
            eager.to_k_ip, eager.to_v_ip = processor.to_k_ip, processor.to_v_ip
            processors[name] = eager
        else:
            processors[name] = AttnProcessor()
    unet.set_attn_processor(processors)


def measure(
    mode: Mode, preset: str, resolution: int, batch_size: int, steps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """One row: build, prefetch two batches, warm up, count FLOPs, time ``steps`` steps."""
    bench_only = ("dtype", "cached", "attention", "compile_mode")
    options = {k: v for k, v in dataclasses.asdict(mode).items() if k not in bench_only}
    if mode.compile_mode is not None:
        options["compile_options"] = {"mode": mode.compile_mode}
    module = build_module(preset, mode.dtype, **options).to(device).train()
    if mode.attention == "eager":
        use_eager_attention(module.unet)
    with tempfile.TemporaryDirectory() as tmp:
        dm = datamodule(module, 2 * batch_size, resolution, batch_size, Path(tmp) if mode.cached else None)
        batches = [to_device(b, device) for b in dm.train_dataloader()][:2]
    optimizer = module.configure_optimizers()["optimizer"]  # what training builds from model.optimizer
    index = iter(range(10**9))

    def step() -> None:
        train_step(module, optimizer, batches[next(index) % len(batches)])

    from torch._dynamo.utils import counters

    started = time.perf_counter()
    for _ in range(warmup):  # with compilation: the compile time
        step()
    sync(device)
    warmup_s = time.perf_counter() - started
    with torch.compiler.set_stance("force_eager"):  # the same maths, counted op by op outside compiled graphs
        flops = count_flops(step)
        saved = saved_activation_bytes(step, list(module.parameters()))
    sync(device)
    graphs = counters["stats"]["unique_graphs"]
    row: dict[str, Any] = {
        "batch_size": batch_size,
        "warmup_s": round(warmup_s, 2),
        "saved_activations_gib": round(saved / 2**30, 3),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(step, steps, device)
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    else:
        with ResidentPeak().track() as resident:
            seconds = timed(step, steps, device)
        row["peak_mem_gib"] = round(resident.peak / 2**30, 3)
    row["recompiles"] = counters["stats"]["unique_graphs"] - graphs
    if row["recompiles"]:  # a compiled step that recompiles while timed is measuring the compiler
        row["error"] = f"{row['recompiles']} graphs compiled during the timed steps"
    row.update(
        step_s=round(seconds, 4),
        images_per_s=round(batch_size / seconds, 3),
        tflop_per_step=round(flops / 1e12, 3),
        achieved_tflops=round(flops / seconds / 1e12, 3),
    )
    peak = peak_tflops(device)
    if peak:
        row["mfu"] = round(flops / seconds / 1e12 / peak, 4)
    return row


def run_isolated(name: str, args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    """Run one (mode, batch size) in a fresh interpreter; its last stdout line is the row."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--preset",
        args.preset,
        "--resolution",
        str(args.resolution),
        "--batch-sizes",
        str(batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = done.stdout.strip().splitlines()
    try:
        row = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        row = {"batch_size": batch_size, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"mode": name, **row}


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Every ratio of ``RATIOS`` whose two modes ran at the same batch size."""
    table = {(r["mode"], r["batch_size"]): r for r in rows if "error" not in r}
    out = {}
    for name, top, bottom, field in RATIOS:
        for (mode, size), row in table.items():
            other = table.get((bottom, size))
            if mode == top and other and other.get(field) and row.get(field):
                out[f"{name}@{size}"] = round(row[field] / other[field], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny or sd15-shape")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--modes", nargs="+", default=None, choices=sorted(MODES), help="default: all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.worker:
        try:
            row = measure(
                MODES[args.worker], args.preset, args.resolution, args.batch_sizes[0], args.steps, args.warmup, device
            )
        except torch.OutOfMemoryError:
            row = {"batch_size": args.batch_sizes[0], "error": "out of memory"}
        except Exception as error:
            traceback.print_exc()
            row = {"batch_size": args.batch_sizes[0], "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(row), flush=True)
        return
    rows = []
    for name in args.modes or list(MODES):
        for size in args.batch_sizes:
            rows.append(run_isolated(name, args, size))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "bench": "train_step",
        "preset": args.preset,
        "resolution": args.resolution,
        "device": card_name(device),
        "torch": torch.__version__,
        "steps": args.steps,
        "rows": rows,
        "ratios": ratios(rows),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
