"""Shared pieces of the benchmarks: model and batch construction, timing, memory and FLOP accounting.

Needs only torch, lightning, transformers, diffusers and open_clip (no Hydra), so it runs on an air-gapped
GPU machine where the last two travel as wheels.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from camouflage_train.data.datamodule import PersonDataModule  # noqa: E402
from camouflage_train.data.sources import SyntheticSource  # noqa: E402
from camouflage_train.models.backbone import load_frozen_backbone  # noqa: E402
from camouflage_train.modules.light_module import LightAdapterModule  # noqa: E402

# Dense bf16 tensor-core peak without sparsity, from the vendors' spec sheets (TFLOP/s).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def adapter_config(preset: str) -> dict[str, Any]:
    """The adapter size of ``configs/model/light.yaml`` (SD shapes) or ``light_<preset>.yaml`` over it (tiny, mini)."""
    adapter = load_yaml(REPO / "configs/model/light.yaml")["adapter"]
    if preset in ("tiny", "mini"):
        adapter = {**adapter, **load_yaml(REPO / f"configs/model/light_{preset}.yaml")["adapter"]}
    return adapter


def build_module(
    preset: str, weight_dtype: str, cache_dir: str | None = None, fused_adamw: bool = False, **options: Any
) -> LightAdapterModule:
    """The training module on ``preset:<preset>`` (random weights, real architecture) with ``light.yaml``'s AdamW
    (``fused_adamw``: its ``fused=true``); ``options`` are ``LightAdapterModule`` flags (gradient_checkpointing,
    frozen_autocast, channels_last, compile_unet, ...)."""
    return LightAdapterModule(
        backbone={
            "pretrained_model_name_or_path": f"preset:{preset}",
            "weight_dtype": weight_dtype,
            "cache_dir": cache_dir,
        },
        adapter=adapter_config(preset),
        schema=load_yaml(REPO / "configs/attributes/face.yaml"),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01, fused=fused_adamw or None),
        lr_scheduler=None,
        **options,
    )


def datamodule(
    module: LightAdapterModule, size: int, resolution: int, batch_size: int, cache_root: Path | None = None
) -> PersonDataModule:
    """Synthetic multi-person scenes through the real data path; ``cache_root`` builds the latent cache."""
    schema = module.schema.to_config()
    cache = None
    if cache_root is not None:
        backbone = dict(module.hparams["backbone"])
        cache = {"enabled": True, "root": str(cache_root), "dtype": "fp16", "batch_size": 8, "backbone": backbone}
    dm = PersonDataModule(
        SyntheticSource(schema, size, resolution, seed=0),
        schema,
        resolution,
        val_source=SyntheticSource(schema, batch_size, resolution, seed=10_000),
        random_crop=False,
        flip_prob=0.0,
        batch_size=batch_size,
        cache=cache,
        encoder_loader=load_frozen_backbone,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print the result as the script's last stdout line (and write it to ``out`` when given)."""
    line = json.dumps(result)
    if out is not None:
        out.write_text(line + "\n")
    print(line)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(module: LightAdapterModule, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    """What Lightning runs per step with ``32-true`` (fp32 backbone) or ``bf16-mixed``/``16-mixed`` (low-precision
    backbone, no loss scaling here): autocast, loss, backward, optimizer step, zero grad."""
    low = module.weight_dtype
    with torch.autocast(
        module.device.type, low if low != torch.float32 else torch.bfloat16, enabled=low != torch.float32
    ):
        loss = module.diffusion_loss(batch, training=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class ResidentPeak:
    """Peak resident memory (bytes) of this process while active, sampled every 2 ms (CPU runs)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @contextmanager
    def track(self) -> Iterator[ResidentPeak]:
        self.peak = self._rss()
        thread = threading.Thread(target=self._poll, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def count_flops(fn: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def saved_activation_bytes(fn: Callable[[], None], weights: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass during ``fn`` (each storage once), ``weights``
    left out: the activation memory that checkpointing trades for recomputation, the same on every device.
    Tensors inside a checkpointed region are not kept, so they are not counted."""
    skip = {w.untyped_storage().data_ptr() for w in weights}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Mean seconds of ``fn`` over ``steps`` calls (the caller warms up first)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps
