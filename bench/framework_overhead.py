"""Lightning's cost per training step: ``Trainer.fit`` vs a bare PyTorch loop, same model, maths and batches.

    python bench/framework_overhead.py                                  # tiny preset, 64², CPU
    python bench/framework_overhead.py --preset sd15-shape --resolution 512 --device cuda --batch-size 16

Both loops iterate the same prefetched batches (already on the device, so data loading is not measured)
and run ``LightAdapterModule.diffusion_loss`` + backward + AdamW. The Lightning side is the real
``training_step`` under a ``Trainer`` configured like ``configs/trainer/default.yaml`` (logging every 10
steps to CSV, gradient clipping, bf16-mixed for low-precision backbones; no validation or checkpoints,
which are periodic costs). The two alternate ``--rounds`` times; each step is timed from its start to the
next step's start, and the medians over all timed steps are compared (robust to bursts of load on a shared
machine). Ends with one JSON line whose ``lightning_over_bare`` is the overhead ratio (target ≤ 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build_module, card_name, datamodule, emit, sync, to_device


class StepTimer(L.Callback):
    """Time between consecutive step starts (everything Lightning does per step), after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.starts = warmup, []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, index: int) -> None:
        sync(module.device)
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        sync(module.device)
        self.starts.append(time.perf_counter())

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.starts[self.warmup : -1], self.starts[self.warmup + 1 :], strict=True)]


def lightning_steps(module, batches, steps: int, warmup: int, device: torch.device, precision: str) -> list[float]:
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision=precision,
            max_steps=warmup + steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=10,
            gradient_clip_val=1.0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=L.pytorch.loggers.CSVLogger(tmp, name="", version=""),
            callbacks=[timer],
            default_root_dir=tmp,
        )
        loader = [batches[i % len(batches)] for i in range(warmup + steps)]
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(loader, batch_size=None))
    return timer.durations()


def bare_steps(module, batches, steps: int, warmup: int, device: torch.device) -> list[float]:
    """The same maths as one Lightning step: autocast, loss, backward, clip, AdamW step, zero grad."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = module.configure_optimizers()["optimizer"]
    low = module.weight_dtype
    starts = []
    for i in range(warmup + steps):
        sync(device)
        starts.append(time.perf_counter())
        with torch.autocast(device.type, low if low != torch.float32 else torch.bfloat16, enabled=low != torch.float32):
            loss = module.diffusion_loss(batches[i % len(batches)], training=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts[warmup:-1], starts[warmup + 1 :], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="frozen weights; default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[dtype]
    module = build_module(args.preset, dtype)
    dm = datamodule(module, 2 * args.batch_size, args.resolution, args.batch_size)
    batches = [to_device(b, device) for b in dm.train_dataloader()][:2]
    lightning, bare = [], []
    for _ in range(args.rounds):
        # Lightning's teardown moves the module back to the CPU after each fit, so place it again every round.
        bare += bare_steps(module.to(device).train(), batches, args.steps, args.warmup, device)
        lightning += lightning_steps(module, batches, args.steps, args.warmup, device, precision)
    ratio = statistics.median(lightning) / statistics.median(bare)
    result = {
        "bench": "framework_overhead",
        "preset": args.preset,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "dtype": dtype,
        "device": card_name(device),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "steps_timed": len(bare),
        "bare_step_s_median": round(statistics.median(bare), 5),
        "lightning_step_s_median": round(statistics.median(lightning), 5),
        "bare_step_s_min": round(min(bare), 5),
        "lightning_step_s_min": round(min(lightning), 5),
        "lightning_over_bare": round(ratio, 4),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
