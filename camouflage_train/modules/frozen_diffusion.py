"""What every module that trains something next to a frozen Stable Diffusion shares (Light's adapter, Base's
ControlNets): the frozen parts stay in eval mode whatever Lightning switches, captions go through the frozen text
encoder, the regression target follows the scheduler's ``prediction_type``, and the loss may be Min-SNR weighted."""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
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
        """Switch the trainable parts to ``mode``; the frozen ones stay in eval mode (no dropout, fixed norms).

        Args:
            mode: training (``True``) or evaluation mode.
        """
        super().train(mode)  # type: ignore[misc]
        for module in (self.vae, self.text_encoder, self.unet):
            module.eval()  # dropout/norm statistics of frozen weights must not change with Lightning's mode
        return self

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """The frozen text encoder's hidden states for ``captions`` (padded to the tokenizer's length).

        Args:
            captions: the prompts.
        """
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def prediction_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet regresses: the noise, the velocity or the clean latents (``prediction_type``).

        Args:
            latents: the clean latents.
            noise: the noise added.
            timesteps: each sample's timestep.
        """
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if prediction_type == "sample":
            return latents
        raise ValueError(f"unsupported scheduler prediction_type '{prediction_type}'")

    def regression_loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        snr_gamma: float | None = None,
        pixel_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared error; with ``snr_gamma``, each sample weighted by Min-SNR-gamma (Hang et al. 2023).

        The weight ``min(SNR, gamma) / SNR`` (epsilon; ``/(SNR + 1)`` for v-prediction) lowers the nearly-clean
        timesteps, whose fine-detail noise dominates the plain loss but carries little of what a conditioning
        (places, hair colour) decides. A weighted mean, so the loss stays on the plain MSE's scale.

        Args:
            prediction: the UNet's output.
            target: :meth:`prediction_target`.
            timesteps: each sample's timestep.
            snr_gamma: Min-SNR-gamma (``None``: plain MSE).
            pixel_weights: ``[B, 1, h, w]`` weights of each latent position within its sample (a weighted mean per
                sample; ``None``: all equal).
        """
        if pixel_weights is None and snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float())
        squared = (prediction.float() - target.float()).pow(2)
        if pixel_weights is None:
            per_sample = squared.flatten(1).mean(dim=1)
        else:
            spatial = pixel_weights.float().expand_as(squared)
            per_sample = (squared * spatial).flatten(1).sum(dim=1) / spatial.flatten(1).sum(dim=1).clamp_min(1e-12)
        if snr_gamma is None:
            return per_sample.mean()
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (or null for the plain loss), got {snr_gamma}")
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = snr.clamp(max=snr_gamma)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            weights = weights / snr
        elif prediction_type == "v_prediction":
            weights = weights / (snr + 1)
        else:
            raise ValueError(f"snr_gamma supports epsilon and v_prediction schedulers, not '{prediction_type}'")
        return (per_sample * weights).sum() / weights.sum()
