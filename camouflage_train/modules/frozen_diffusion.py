"""What every module that trains something next to a frozen Stable Diffusion shares (Light's adapter, Base's
ControlNets): the frozen parts stay in eval mode whatever Lightning switches, captions go through the frozen text
encoder, and the regression target follows the scheduler's ``prediction_type``."""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import nn


class FrozenDiffusionMixin:
    """Mix into a ``LightningModule`` that sets ``vae``, ``text_encoder``, ``unet``, ``tokenizer`` and
    ``noise_scheduler`` (from :func:`~camouflage_train.models.backbone.load_frozen_backbone`)."""

    vae: nn.Module
    text_encoder: nn.Module
    unet: nn.Module
    tokenizer: Any
    noise_scheduler: Any
    device: torch.device

    def train(self, mode: bool = True) -> Self:
        super().train(mode)  # type: ignore[misc]
        for module in (self.vae, self.text_encoder, self.unet):
            module.eval()  # dropout/norm statistics of frozen weights must not change with Lightning's mode
        return self

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def prediction_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet regresses: the noise, the velocity or the clean latents (``prediction_type``)."""
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if prediction_type == "sample":
            return latents
        raise ValueError(f"unsupported scheduler prediction_type '{prediction_type}'")
