"""Train the mini base model (AutoencoderKL, then UNet2DConditionModel + CLIP text encoder) on synthetic scenes.

Stable Diffusion's recipe at miniature scale: the autoencoder first (pixel MSE + a small KL term), its latent
scale measured and stored as ``scaling_factor``, then epsilon prediction with SD's scaled-linear schedule on the
frozen autoencoder's latents, min-SNR-5 loss weights, 10 % empty captions (for classifier-free guidance) and an
EMA of the weights, which is what gets saved. The output folder is a diffusers ``StableDiffusionPipeline``
folder, loaded by the same ``from_pretrained`` calls as SD 1.5.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from camouflage_train.miniworld.scenes import SceneBank, draw_bank
from camouflage_train.models.presets import CONFIG_ROOT, write_clip_tokenizer, write_model_index

MINI_CONFIGS = CONFIG_ROOT / "mini"


@dataclass
class BaseBuildConfig:
    """The mini base's training recipe (``python -m camouflage_train.miniworld.build --part base``).

    Args:
        seed: the training seed.
        num_scenes: synthetic scenes drawn (each also mirrored).
        first_scene_seed: their first seed, apart from the demo's training (0..) and validation (1,000,000..) scenes.
        resolution: the scenes' size in pixels.
        batch_size: scenes per step.
        vae_steps: autoencoder training steps.
        vae_lr: its learning rate.
        kl_weight: the weight of its KL term.
        unet_steps: denoiser (UNet + text encoder) training steps.
        unet_lr: its learning rate.
        warmup_steps: linear warm-up of both.
        caption_dropout: share of empty captions (for classifier-free guidance).
        min_snr_gamma: Min-SNR loss weighting of the denoiser.
        ema_decay: the decay of the weights' exponential moving average that is saved.
        threads: CPU threads (0: torch's default).
        device: ``cpu`` or ``cuda`` (random draws stay on the CPU, so seeds mean the same).
        init_from: continue from this built base folder's UNet (``None``: from scratch).
    """

    seed: int = 0
    num_scenes: int = 8192
    first_scene_seed: int = 2_000_000  # apart from the demo's training (0..) and validation (1_000_000..) scenes
    resolution: int = 64
    batch_size: int = 32
    vae_steps: int = 600
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 2000
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.998
    threads: int = 0  # 0: torch's default
    device: str = "cpu"  # "cuda": the same recipe on a GPU (random draws stay on the CPU, so seeds mean the same)
    # A mini base folder to continue from: its autoencoder is kept as is (no autoencoder steps) and its denoiser
    # and text encoder are trained on for ``unet_steps`` on the scenes drawn now (a world change costs minutes).
    init_from: str | None = None


Log = Callable[[str], None]


def _read(name: str) -> dict:
    return json.loads((MINI_CONFIGS / f"{name}.json").read_text(encoding="utf-8"))


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(params: list[nn.Parameter], lr: float, total: int, warmup: int) -> tuple:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, total, warmup))
    return optimizer, scheduler


def train_autoencoder(bank: SceneBank, cfg: BaseBuildConfig, generator: torch.Generator, log: Log) -> nn.Module:
    """Train the mini VAE (MSE + L1 + a small KL) on the bank's scenes.

    Args:
        bank: the training scenes.
        cfg: the recipe.
        generator: the training's random numbers.
        log: where progress lines go.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(_read("vae")).to(cfg.device).train()
    optimizer, scheduler = _optimizer(list(vae.parameters()), cfg.vae_lr, cfg.vae_steps, cfg.warmup_steps)
    start = time.perf_counter()
    for step in range(cfg.vae_steps):
        index = torch.randint(len(bank), (cfg.batch_size,), generator=generator)
        x = bank.pixels(index, torch.rand(cfg.batch_size, generator=generator) < 0.5).to(cfg.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(cfg.device)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + F.l1_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log(f"autoencoder step {step}/{cfg.vae_steps} mse {mse.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_bank(vae: nn.Module, bank: SceneBank, batch_size: int = 128) -> torch.Tensor:
    """Posterior means of every scene and of its mirror image: ``[2N, C, h, w]`` (unscaled, on the CPU).

    Args:
        vae: the trained autoencoder.
        bank: the scenes.
        batch_size: scenes per encoding batch.
    """
    out = []
    device = next(vae.parameters()).device
    for flip in (False, True):
        for i in range(0, len(bank), batch_size):
            index = torch.arange(i, min(i + batch_size, len(bank)))
            x = bank.pixels(index, torch.full((len(index),), flip)).to(device)
            out.append(vae.encode(x).latent_dist.mean.cpu())
    return torch.cat(out)


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


def train_denoiser(
    latents: torch.Tensor, captions: list[str], tokenizer, cfg: BaseBuildConfig, generator: torch.Generator, log: Log
) -> tuple[nn.Module, nn.Module, list[float]]:
    """UNet + text encoder on scaled latents; returns their EMA copies and the loss curve (means of 50 steps).

    Args:
        latents: the scenes' scaled latents.
        captions: their captions.
        tokenizer: the CLIP tokenizer.
        cfg: the recipe.
        generator: the training's random numbers.
        log: where progress lines go.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if cfg.init_from:  # fp16 storage: trained on in fp32
        unet = UNet2DConditionModel.from_pretrained(Path(cfg.init_from) / "unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(Path(cfg.init_from) / "text_encoder", torch_dtype=torch.float32)
    else:
        unet = UNet2DConditionModel.from_config(_read("unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(_read("text_encoder")))
    unet, text_encoder = unet.to(cfg.device).train(), text_encoder.to(cfg.device).train()
    schedule = DDPMScheduler.from_config(_read("scheduler"))
    alphas = schedule.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(cfg.device)
    # Distinct captions once; each step encodes only those (4 counts + the empty caption).
    vocabulary = [*sorted(set(captions)), ""]
    tokens = tokenizer(vocabulary, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    tokens = tokens.to(cfg.device)
    caption_index = torch.tensor([vocabulary.index(c) for c in captions] * 2)  # latents hold N scenes + N mirrors
    empty = len(vocabulary) - 1
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer, scheduler = _optimizer(params, cfg.unet_lr, cfg.unet_steps, cfg.warmup_steps)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    curve, window, start = [], [], time.perf_counter()
    for step in range(cfg.unet_steps):
        index = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        x0 = latents[index]
        chosen = caption_index[index].clone()
        chosen[torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout] = empty
        t = torch.randint(0, schedule.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        xt = schedule.add_noise(x0, noise, t)
        xt, noise, t, chosen = xt.to(cfg.device), noise.to(cfg.device), t.to(cfg.device), chosen.to(cfg.device)
        context = text_encoder(tokens)[0][chosen]
        pred = unet(xt, t, encoder_hidden_states=context).sample
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        window.append(per_sample.mean().item())
        if len(window) == 50 or step == cfg.unet_steps - 1:
            curve.append(sum(window) / len(window))
            window = []
            log(f"denoiser step {step}/{cfg.unet_steps} loss {curve[-1]:.4f} ({time.perf_counter() - start:.0f} s)")
    return ema_unet.requires_grad_(False), ema_text.requires_grad_(False), curve


def _earlier_autoencoder(cfg: BaseBuildConfig) -> nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(cfg.init_from) / "vae", torch_dtype=torch.float32)
    return vae.to(cfg.device).eval().requires_grad_(False)


def _lineage(init_from: str) -> list[dict]:
    """The builds a continued base descends from, oldest first: the earlier build's own lineage, then it."""
    earlier = json.loads((Path(init_from) / "build.json").read_text(encoding="utf-8"))
    return [*earlier.get("lineage", []), {k: v for k, v in earlier.items() if k != "lineage"}]


def build_mini_base(folder: Path, cfg: BaseBuildConfig, log: Log = print) -> dict:
    """Train and write the mini base into ``folder`` (a diffusers pipeline folder); return build metrics.

    Args:
        folder: the output folder.
        cfg: the recipe.
        log: where progress lines go.
    """
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    lineage = _lineage(cfg.init_from) if cfg.init_from else None  # read before anything is written
    if cfg.init_from:  # build.json records what ran: no autoencoder steps
        cfg = replace(cfg, vae_steps=0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    bank = draw_bank(cfg.first_scene_seed, cfg.num_scenes, cfg.resolution)
    log(f"drew {len(bank)} scenes at {cfg.resolution}² ({time.perf_counter() - start:.0f} s)")
    # A continued base keeps the earlier latent space and its scale; a new one measures its scale.
    vae = _earlier_autoencoder(cfg) if cfg.init_from else train_autoencoder(bank, cfg, generator, log)
    raw = encode_bank(vae, bank)
    if not cfg.init_from:
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    scaling = float(vae.config.scaling_factor)
    with torch.no_grad():
        probe = bank.pixels(torch.arange(min(256, len(bank)))).to(cfg.device)
        recon_mse = F.mse_loss(vae.decode(vae.encode(probe).latent_dist.mean).sample, probe).item()
    log(f"autoencoder: reconstruction MSE {recon_mse:.4f}, latent scaling factor {scaling:.4f}")
    write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    unet, text_encoder, curve = train_denoiser(raw * scaling, bank.captions, tokenizer, cfg, generator, log)
    for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        module.to("cpu", torch.float16).save_pretrained(folder / name)  # fp16 storage; loaders cast to weight_dtype
    DDPMScheduler.from_config(_read("scheduler")).save_pretrained(folder / "scheduler")
    write_model_index(folder, "DDPMScheduler")
    metrics = {
        "config": asdict(cfg),
        "autoencoder_reconstruction_mse": recon_mse,
        "latent_scaling_factor": scaling,
        "denoiser_loss_curve_per_50_steps": curve,
        "seconds": time.perf_counter() - start,
        **({"lineage": lineage} if lineage else {}),
    }
    (folder / "build.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics
