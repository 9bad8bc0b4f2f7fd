"""The GPU benchmark: training step, framework overhead and Light/Base inference on SD 1.5 shapes, < 10 min.

For an air-gapped GPU machine with torch, lightning and transformers installed; diffusers, open_clip,
ftfy, wcwidth (and PyYAML if missing) travel as wheels, Hydra/wandb/datasets are not needed:

    python bench/gpu_suite.py --out bench/results/gpu.json             # sd15-shape, 512², bf16
    python bench/gpu_suite.py --preset tiny --resolution 64 --device cpu --train-batch-sizes 2 \
        --modes-batch-size 2 --quick                                   # smoke

Runs, in this order and within ``--budget-s`` (what does not fit is reported as skipped):
1. ``bench/train_step.py``: ``bf16`` (native bf16 frozen backbone) at each ``--train-batch-sizes``;
   images/s, peak memory, TFLOP/step, MFU against the card's dense bf16 peak.
2. ``bench/inference_ratio.py``: Light vs Base seconds per image, each at its configured operating point, batch 4.
3. ``bench/framework_overhead.py`` at ``--modes-batch-size`` (16).
4. ``bench/train_step.py`` at ``--modes-batch-size`` for ``--modes`` (default: autocast, cached latents,
   diffusers' per-person adapter attention loop, fused AdamW, checkpointing of every block and of the
   full-resolution blocks only, fp32, channels-last, regional and whole-UNet torch.compile, all fastest options,
   the cached step under CUDA graphs, eager attention). Each row reports its warm-up (compile) seconds and fails if
   a graph is compiled while timed.
Ends with one JSON line holding every result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.common import emit  # noqa: E402

# Most informative first: what does not fit in --budget-s is skipped from the end.
SECOND_MODES = (
    "bf16-autocast",
    "bf16-cached",
    "bf16-compile-blocks",
    "fastest",
    "bf16-cudagraphs",
    "bf16-person-loop",
    "bf16-ckpt-high-res",
    "bf16-ckpt",
    "bf16-fused-adamw",
    "fp32",
    "bf16-channels-last",
    "bf16-eager-attention",
    "bf16-compile",
)


def run_json(command: list[str], timeout: float) -> dict[str, Any]:
    """Run a bench script; its last stdout line is its JSON result."""
    if timeout <= 5:
        return {"skipped": "time budget spent"}
    try:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")])),
        }
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=BENCH.parent, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    sys.stderr.write(done.stderr[-3000:])
    # The part's whole wall time (process start, model load, compile) is what the next run's budget needs.
    part_s = round(time.perf_counter() - began, 1)
    try:
        return {**json.loads(done.stdout.strip().splitlines()[-1]), "part_s": part_s}
    except (IndexError, json.JSONDecodeError):
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1], "part_s": part_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15-shape")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--train-batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--modes-batch-size", type=int, default=16, help="batch size of the --modes rows")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", nargs="+", default=list(SECOND_MODES), help="modes run at --modes-batch-size")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting new parts after this")
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke runs)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    steps = "2" if args.quick else "6"
    common = ["--preset", args.preset, "--resolution", str(args.resolution), "--device", args.device]
    sizes = args.train_batch_sizes
    modes_size = args.modes_batch_size
    # Materialise the presets once (first load builds them), so no timed part pays for it.
    results: dict[str, Any] = {
        "bench": "gpu_suite",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "preset": args.preset,
        "resolution": args.resolution,
    }
    prepare = [
        sys.executable,
        "-c",
        "from camouflage_train.models.presets import materialize_preset as m; "
        + "; ".join(f"m('{name}')" for name in [args.preset] + [f"{args.preset}-controlnet-{i}" for i in range(1, 7)])
        + "; print('{}')",
    ]
    results["prepare"] = run_json(prepare, left())

    def train_rows(plan: list[tuple[str, int]]) -> list[dict[str, Any]]:
        rows = []
        for mode, size in plan:
            command = [sys.executable, str(BENCH / "train_step.py"), *common, "--modes", mode]
            command += ["--batch-sizes", str(size), "--steps", steps, "--warmup", "2"]
            row = run_json(command, left())
            whole = {"part_s": row["part_s"]} if "part_s" in row else {}
            rows.extend({**r, **whole} for r in row.get("rows", [{"mode": mode, "batch_size": size, **row}]))
            print(json.dumps(rows[-1]), flush=True)
        return rows

    # In order of importance, so a slow machine drops the least important parts: the bf16 step over batch
    # sizes, Light/Base inference, Lightning's overhead, then the other modes at --modes-batch-size.
    rows = train_rows([("bf16", size) for size in sizes])
    inference = [sys.executable, str(BENCH / "inference_ratio.py"), *common, "--dtype", "bf16"]
    inference += ["--batch", "4", "--repeats", "1"]  # each method at its configured operating point
    inference += ["--steps", "2"] if args.quick else []
    results["inference"] = run_json(inference, left())
    print(json.dumps({"inference": results["inference"]}), flush=True)
    overhead = [sys.executable, str(BENCH / "framework_overhead.py"), *common, "--batch-size", str(modes_size)]
    overhead += ["--dtype", "bf16", "--steps", "10" if not args.quick else "3", "--rounds", "2"]
    results["framework_overhead"] = run_json(overhead, left())
    print(json.dumps({"framework_overhead": results["framework_overhead"]}), flush=True)
    rows += train_rows([(mode, modes_size) for mode in args.modes])
    from bench.train_step import ratios

    results["train_step"] = {"rows": rows, "ratios": ratios(rows)}
    results["wall_s"] = round(time.perf_counter() - start, 1)
    emit(results, args.out)


if __name__ == "__main__":
    main()
