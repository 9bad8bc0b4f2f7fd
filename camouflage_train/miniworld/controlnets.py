"""Train CAMOUFLaGE-Base's two ControlNets of the miniature world with the framework's own training job.

``controlnet_canny`` follows Canny edges (the structure ControlNet); ``controlnet_recon`` is fed the real image (the
reconstruction ControlNet of the anonymization guidance). Both are ``python train.py experiment=controlnet_mini``
runs on the frozen mini base, composed here from ``configs/`` so the build and a user's run are the same code path;
the result is stored in fp16 (``ControlNetModel.from_pretrained`` folder) and loaded as ``preset:mini-canny`` and
``preset:mini-recon``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# part name -> the `model.condition` override of experiment=controlnet_mini
CONDITIONS: dict[str, str] = {
    "controlnet_canny": "model.condition._target_=camouflage_train.pipelines.controls.CannyEdges",
    "controlnet_recon": "model.condition=null",
}
REPO = Path(__file__).resolve().parents[2]


@dataclass
class ControlNetBuildConfig:
    """The recipe of the mini world's ControlNets (trained with ``train.py experiment=controlnet_mini``).

    Args:
        base: the frozen base it is trained on (the build passes the base built next to it).
        seed: the training seed.
        train_steps: training steps.
        warmup_steps: linear warm-up steps.
        batch_size: scenes per step.
        lr: the learning rate.
        num_scenes: synthetic training scenes.
        threads: CPU threads (0: torch's default).
        device: ``cpu`` or ``cuda``.
    """

    base: str = "preset:mini"  # the frozen base it is trained on (the build passes the base it built next to it)
    seed: int = 0
    train_steps: int = 1200
    warmup_steps: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    num_scenes: int = 8192
    threads: int = 0  # 0: torch's default
    device: str = "cpu"


def controlnet_overrides(part: str, cfg: ControlNetBuildConfig, output_dir: Path) -> list[str]:
    """The ``train.py`` overrides that train ``part``: what a user types to rebuild it by hand.

    Args:
        part: ``controlnet_canny`` or ``controlnet_recon``.
        cfg: the recipe.
        output_dir: the training run's folder.
    """
    accelerator = "gpu" if cfg.device.startswith("cuda") else "cpu"
    return [
        "experiment=controlnet_mini",
        CONDITIONS[part],
        f"seed={cfg.seed}",
        f"paths.output_dir={output_dir}",
        f"model.backbone.pretrained_model_name_or_path={cfg.base}",
        "logger=csv",
        f"trainer.accelerator={accelerator}",
        f"trainer.max_steps={cfg.train_steps}",
        f"trainer.val_check_interval={max(1, cfg.train_steps // 2)}",
        f"callbacks.model_checkpoint.every_n_train_steps={max(1, cfg.train_steps // 2)}",
        f"data.batch_size={cfg.batch_size}",
        f"data.train_source.num_samples={cfg.num_scenes}",
        f"model.optimizer.lr={cfg.lr}",
        f"model.lr_scheduler.warmup_steps={cfg.warmup_steps}",
    ]


def _val_loss(module, batches: list[dict]) -> float:
    with torch.no_grad():
        losses = [module.diffusion_loss(b, generator=torch.Generator().manual_seed(i)) for i, b in enumerate(batches)]
    return float(torch.stack(losses).mean())


def build_mini_controlnet(
    folder: Path, cfg: ControlNetBuildConfig, log: Callable[[str], None] = print, *, part: str
) -> dict:
    """Train ``part`` (a key of :data:`CONDITIONS`), write it into ``folder`` in fp16, return build metrics.

    Args:
        folder: the output folder.
        cfg: the recipe.
        log: where progress lines go.
        part: which ControlNet.
    """
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from camouflage_train.training import run_training

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.environ.setdefault("PROJECT_ROOT", str(REPO))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"{part}-") as run_dir:
        overrides = controlnet_overrides(part, cfg, Path(run_dir))
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            train_cfg = compose("train.yaml", overrides=overrides)
        log(f"{part}: python train.py {' '.join(o for o in overrides if not o.startswith('paths.'))}")
        run_training(train_cfg)
        seconds = time.time() - started

        # Paired validation loss (same scenes, noise and timesteps) of the zero-initialised and the trained
        # ControlNet: the first is the frozen base's own loss, so the difference is what the control adds.
        data = instantiate(train_cfg.data)
        data.setup("fit")
        batches = list(data.val_dataloader())[:4]
        module = instantiate(train_cfg.model)
        before = _val_loss(module, batches)
        from diffusers import ControlNetModel

        trained = ControlNetModel.from_pretrained(Path(run_dir) / "controlnet")
        module.controlnet.load_state_dict(trained.state_dict())
        after = _val_loss(module, batches)
        trained.to(torch.float16).save_pretrained(folder)
    metrics = {
        "config": asdict(cfg),
        "train_command": "python train.py " + " ".join(o for o in overrides if not o.startswith("paths.")),
        "seconds": round(seconds, 1),
        "val_loss_zero_controlnet": before,
        "val_loss_trained": after,
    }
    log(f"{part}: paired val loss {before:.4f} (no control) -> {after:.4f} in {seconds:.0f} s")
    (folder / "build.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics
