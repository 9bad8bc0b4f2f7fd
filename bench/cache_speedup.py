"""Training steps/s from raw images vs from the latent cache, on one config, in one process.

    python bench/cache_speedup.py                       # the demo (tiny SD, synthetic 64² scenes, CPU)
    python bench/cache_speedup.py experiment=demo data.resolution=128 --steps 40

Ends with one JSON line: build time of the cache, steps/s of both paths and their ratio.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402


def steps_per_second(module, loader, steps: int, warmup: int = 3) -> float:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batches = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        batch = next(batches)
        loss = module.diffusion_loss(batch, dropout=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 30
    args = [a for a in args if not a.isdigit()] or ["experiment=demo"]
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("train.yaml", overrides=[*args, f"paths.output_dir={tmp}", f"data.cache.root={tmp}/latents"])
        module = instantiate(cfg.model).train()
        raw_dm = instantiate(cfg.data)
        raw_dm.setup("fit")
        cfg.data.cache.enabled = True
        cached_dm = instantiate(cfg.data)
        start = time.perf_counter()
        cached_dm.prepare_data()
        build_s = time.perf_counter() - start
        cached_dm.setup("fit")
        raw = steps_per_second(module, raw_dm.train_dataloader(), steps)
        cached = steps_per_second(module, cached_dm.train_dataloader(), steps)
    print(
        json.dumps(
            {
                "config": args,
                "batch_size": cfg.data.batch_size,
                "resolution": cfg.data.resolution,
                "images": len(cached_dm.train_set),
                "cache_build_s": round(build_s, 2),
                "raw_steps_per_s": round(raw, 3),
                "cached_steps_per_s": round(cached, 3),
                "speedup": round(cached / raw, 3),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
