"""ControlNet training on a frozen Stable Diffusion (CAMOUFLaGE-Base's structure and reconstruction ControlNets).

Trainable: a diffusers ``ControlNetModel.from_unet`` copy of the frozen UNet's encoder (fp32). Frozen: VAE, text
encoder, UNet in ``backbone.weight_dtype``. The condition is a control map of the training image: any
preprocessor of :mod:`camouflage_train.pipelines.controls` (edges, lines, ...) for a structure ControlNet, or the
image itself (``condition: null``) for the reconstruction ControlNet of the anonymization guidance. Checkpoints
hold only the ControlNet; at the end of training it is written with ``save_pretrained`` into ``output``, the folder
``MultiControlNetModel`` and the Base pipeline load unchanged (``controlnets.<name>.model: <output>``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.optim import Optimizer

from camouflage_train.models.backbone import load_frozen_backbone, parse_dtype
from camouflage_train.modules.frozen_diffusion import FrozenDiffusionMixin
from camouflage_train.modules.schedules import with_schedule
from camouflage_train.pipelines.controls import Preprocessor
from camouflage_train.utils.atomic import atomic_folder

log = logging.getLogger(__name__)

# Conditioning-embedding widths; one stride-2 step between consecutive entries, so the embedding downsamples
# like the VAE (SD 1.5: x8 -> four entries, diffusers' default).
_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def conditioning_channels(vae_factor: int) -> tuple[int, ...]:
    """The conditioning embedding's widths for a VAE that downsamples ``vae_factor`` times (one stride-2 step per entry
    after the first).

    Args:
        vae_factor: the VAE's downsampling factor (a power of two).
    """
    steps = int(np.log2(vae_factor))
    if 2**steps != vae_factor or steps >= len(_EMBEDDING_CHANNELS):
        raise ValueError(f"unsupported VAE downsampling factor {vae_factor}")
    return _EMBEDDING_CHANNELS[: steps + 1]


class ControlNetModule(FrozenDiffusionMixin, L.LightningModule):
    """Train a ControlNet with the noise-prediction objective of the frozen base.

    Args:
        backbone: kwargs of :func:`~camouflage_train.models.backbone.load_frozen_backbone`.
        condition: the control-map preprocessor (PIL -> PIL), or ``None`` for the image itself (reconstruction).
        optimizer: a partial optimizer taking the trainable parameters (Hydra ``_partial_: true``).
        lr_scheduler: ``{name, warmup_steps}`` for ``diffusers.optimization.get_scheduler``, or ``None``.
        text_dropout: probability of an empty caption (classifier-free guidance at sampling).
        output: where ``save_pretrained`` writes the final ControlNet (``None``: not written).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        condition: Preprocessor | None,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], Optimizer],
        lr_scheduler: Mapping[str, Any] | None = None,
        text_dropout: float = 0.05,
        output: str | None = None,
    ) -> None:
        from diffusers import ControlNetModel

        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "condition"], logger=False)
        if not 0.0 <= text_dropout < 1.0:
            raise ValueError(f"model.text_dropout must be in [0, 1), got {text_dropout}")
        self.optimizer_factory, self.condition = optimizer, condition
        self.weight_dtype = parse_dtype(backbone.get("weight_dtype", "fp32"))
        frozen = load_frozen_backbone(**backbone)
        self.backbone_name = frozen.name
        self.vae, self.text_encoder, self.unet = frozen.vae, frozen.text_encoder, frozen.unet
        self.tokenizer, self.noise_scheduler = frozen.tokenizer, frozen.noise_scheduler
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        channels = conditioning_channels(self.vae_factor)
        self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=channels)
        self.controlnet.to(torch.float32).train().requires_grad_(True)
        self.strict_loading = False  # checkpoints hold the ControlNet only

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("controlnet.")}
        checkpoint["camouflage"] = {"kind": "controlnet", "backbone": self.backbone_name}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {f"controlnet.{k}" for k in self.controlnet.state_dict()}
        if set(checkpoint["state_dict"]) != expected:
            raise ValueError("checkpoint does not hold this ControlNet (another backbone or a Light checkpoint?)")

    def control_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The condition of each image in [0, 1], ``[B, 3, H, W]``: its control map, or itself.

        Args:
            pixel_values: the batch's images in ``[-1, 1]``.
        """
        images01 = (pixel_values.float().clamp(-1, 1) + 1) / 2
        if self.condition is None:
            return images01
        maps = []
        for image in images01.cpu():
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            control = self.condition(Image.fromarray(array)).convert("RGB")
            maps.append(torch.from_numpy(np.asarray(control).copy()).permute(2, 0, 1).float() / 255)
        return torch.stack(maps)

    @torch.no_grad()
    def _encode(self, batch: dict[str, Any], drop_text: torch.Tensor, generator: torch.Generator | None):
        pixels = batch["pixel_values"].to(self.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        sample = torch.randn(dist.mean.shape, generator=generator, device=self.device)  # fp32, like the noise
        latents = (dist.mean.float() + dist.std.float() * sample) * self.vae.config.scaling_factor
        captions = ["" if d else c for d, c in zip(drop_text.tolist(), batch["caption"], strict=True)]
        return latents, self.encode_text(captions)

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The ControlNet's training objective on the frozen UNet: MSE between the prediction and the scheduler's target
        at uniform random timesteps.

        Args:
            batch: a training batch.
            generator: validation's seeded random numbers (no caption dropout then); ``None`` in training.
        """
        n = batch["pixel_values"].shape[0]
        drop_text = torch.rand(n, generator=generator, device=self.device).cpu() < self.hparams.text_dropout
        if generator is not None:  # validation: no dropout, same draws every time
            drop_text[:] = False
        latents, text = self._encode(batch, drop_text, generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (n,), generator=generator, device=self.device)
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        noisy, target = self.noisy_latents_and_target(latents, noise, timesteps)
        control = self.control_images(batch["pixel_values"]).to(self.device)
        down, mid = self.controlnet(
            noisy.float(), timesteps, encoder_hidden_states=text.float(), controlnet_cond=control, return_dict=False
        )
        prediction = self.unet(
            noisy.to(self.weight_dtype),
            timesteps,
            encoder_hidden_states=text.to(self.weight_dtype),
            down_block_additional_residuals=[r.to(self.weight_dtype) for r in down],
            mid_block_additional_residual=mid.to(self.weight_dtype),
        ).sample
        return self.regression_loss(prediction, target, timesteps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch.get("size", 1) == 0:
            return None
        loss = self.diffusion_loss(batch)
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["pixel_values"].shape[0]
        )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch.get("size", 1) == 0:
            return
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        loss = self.diffusion_loss(batch, generator=generator)
        self.log(
            "val/loss", loss, prog_bar=True, on_epoch=True, batch_size=batch["pixel_values"].shape[0], sync_dist=True
        )

    def on_train_end(self) -> None:
        if self.hparams.output and self.trainer.is_global_zero:
            with atomic_folder(Path(self.hparams.output), replace=True) as staging:
                self.controlnet.save_pretrained(staging)
            log.info("wrote the ControlNet to %s", self.hparams.output)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([p for p in self.controlnet.parameters() if p.requires_grad])
        return with_schedule(optimizer, self.hparams.lr_scheduler, lambda: self.trainer.estimated_stepping_batches)
