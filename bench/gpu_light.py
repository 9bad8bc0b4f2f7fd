"""GPU check of the Light training path on the exact SD 1.5 architecture (random weights, no download).

Runs on an air-gapped GPU machine (diffusers and open_clip may travel as wheels; no Hydra needed):

    python bench/gpu_light.py --out results.json                    # sd15-shape, 512², bf16
    python bench/gpu_light.py --preset tiny --resolution 64 --device cpu --batch-sizes 2   # local smoke run

It measures, in one process: the training step (forward + backward + AdamW step, adapter fp32, frozen
backbone bf16 under autocast) at several batch sizes, with images/s, peak memory and model FLOP
utilisation (FLOPs counted by ``torch.utils.flop_counter``); the same with gradient checkpointing; a short
Lightning ``Trainer.fit`` (bf16-mixed, validation sampling included) to check the real path end to end;
and Light sampling seconds per image. It ends with one JSON line of results.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from camouflage_train.data.datamodule import PersonDataModule  # noqa: E402
from camouflage_train.data.sources import SyntheticSource  # noqa: E402
from camouflage_train.modules.light_module import LightAdapterModule  # noqa: E402
from camouflage_train.pipelines.light import PersonBatch, build_pipeline, generate_light  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), from the vendors' spec sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def build_module(preset: str, cache_dir: str, weight_dtype: str, checkpointing: bool) -> LightAdapterModule:
    light = load_yaml(REPO / "configs/model/light.yaml")
    return LightAdapterModule(
        backbone={
            "pretrained_model_name_or_path": f"preset:{preset}",
            "weight_dtype": weight_dtype,
            "cache_dir": cache_dir,
        },
        adapter=light["adapter"],
        schema=load_yaml(REPO / "configs/attributes/face.yaml"),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01),
        lr_scheduler=None,
        gradient_checkpointing=checkpointing,
        validation={"num_images": 2, "num_inference_steps": 10, "guidance_scale": 7.5, "seed": 0},
    )


def synthetic_batch(module: LightAdapterModule, size: int, resolution: int, device: torch.device) -> dict[str, Any]:
    source = SyntheticSource(module.schema.to_config(), size, resolution, seed=0)
    dm = PersonDataModule(source, module.schema.to_config(), resolution, val_source=source, batch_size=size)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(module: LightAdapterModule, optimizer: torch.optim.Optimizer, batch: dict, autocast: bool) -> None:
    with torch.autocast(batch["pixel_values"].device.type, torch.bfloat16, enabled=autocast):
        loss = module.diffusion_loss(batch, dropout=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(module, device, resolution, batch_sizes, steps, warmup, autocast) -> list[dict[str, Any]]:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    for size in batch_sizes:
        batch = synthetic_batch(module, size, resolution, device)
        try:
            for _ in range(warmup):
                train_step(module, optimizer, batch, autocast)
            sync(device)
            flops = None
            if device.type == "cuda":
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    train_step(module, optimizer, batch, autocast)
                flops = counter.get_total_flops()
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(module, optimizer, batch, autocast)
            sync(device)
            seconds = (time.perf_counter() - start) / steps
        except torch.OutOfMemoryError:
            rows.append({"batch_size": size, "oom": True})
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        row = {"batch_size": size, "step_s": round(seconds, 4), "images_per_s": round(size / seconds, 2)}
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        peak = peak_tflops(device)
        if flops is not None:
            row["tflop_per_step"] = round(flops / 1e12, 2)
            row["achieved_tflops"] = round(flops / seconds / 1e12, 1)
            if peak:
                row["mfu"] = round(flops / seconds / 1e12 / peak, 3)
        rows.append(row)
        print(json.dumps({"train": row}), flush=True)
    return rows


def lightning_run(module, device, resolution, out_dir: Path) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    source = SyntheticSource(module.schema.to_config(), 64, resolution, seed=0)
    val = SyntheticSource(module.schema.to_config(), 4, resolution, seed=10_000)
    dm = PersonDataModule(source, module.schema.to_config(), resolution, val_source=val, batch_size=4, num_workers=4)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=6,
        val_check_interval=6,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=out_dir,
        logger=CSVLogger(out_dir, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    ckpts = sorted((out_dir / "checkpoints").glob("*.ckpt"))
    return {
        "fit_s": round(time.perf_counter() - start, 1),
        "train_loss": round(float(trainer.callback_metrics["train/loss"]), 4),
        "val_loss": round(float(trainer.callback_metrics["val/loss"]), 4),
        "checkpoint_mib": round(ckpts[-1].stat().st_size / 2**20, 2) if ckpts else None,
        "samples": [p.name for p in (out_dir / "samples").glob("*.png")],
        "adapter_dtypes": sorted({str(p.dtype) for p in module.parameters() if p.requires_grad}),
        "frozen_dtypes": sorted({str(p.dtype) for p in module.parameters() if not p.requires_grad}),
    }


def measure_sampling(module, device, resolution, batch: int, steps: int, autocast: bool) -> dict[str, Any]:
    data = synthetic_batch(module, batch, resolution, device)
    pipe = build_pipeline(module.vae, module.text_encoder, module.tokenizer, module.unet, module.noise_scheduler.config)
    persons = PersonBatch.from_batch(data)

    def run() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            generate_light(
                pipe,
                module.encoder,
                module.adapter_config,
                persons,
                list(data["caption"]),
                resolution,
                resolution,
                num_inference_steps=steps,
                guidance_scale=7.5,
            )

    run()
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    seconds = time.perf_counter() - start
    return {"batch_size": batch, "steps": steps, "s_per_image": round(seconds / batch, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15-shape")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", default=os.environ.get("CAMOUFLAGE_CACHE", str(REPO / ".cache")))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    weight_dtype = "bf16" if autocast else "fp32"
    results: dict[str, Any] = {
        "preset": args.preset,
        "resolution": args.resolution,
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if autocast else "cpu",
        "torch": torch.__version__,
        "peak_bf16_tflops": peak_tflops(device),
    }
    start = time.perf_counter()
    module = build_module(args.preset, args.cache_dir, weight_dtype, checkpointing=False).to(device)
    results["build_s"] = round(time.perf_counter() - start, 1)
    results["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    results["frozen_params"] = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    print(json.dumps({"built": results}), flush=True)

    results["train"] = measure_training(
        module, device, args.resolution, args.batch_sizes, args.steps, args.warmup, autocast
    )
    module.unet.enable_gradient_checkpointing()
    results["train_checkpointing"] = measure_training(
        module, device, args.resolution, args.batch_sizes[-1:], args.steps, args.warmup, autocast
    )
    module.unet.disable_gradient_checkpointing()
    results["sampling"] = measure_sampling(module, device, args.resolution, 4, 25, autocast)
    print(json.dumps({"sampling": results["sampling"]}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["lightning"] = lightning_run(module, device, args.resolution, Path(tmp))
    line = json.dumps(results)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
