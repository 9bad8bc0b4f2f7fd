"""What every module that trains something next to a frozen Stable Diffusion shares (Light's adapter, Base's
ControlNets): the frozen parts stay in eval mode whatever Lightning switches, captions go through the frozen text
encoder, the regression target follows the scheduler's ``prediction_type``, and the loss may be Min-SNR weighted."""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from camouflage_train.models.backbone import add_noise_fp32


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

    def noisy_latents_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward process at ``timesteps`` and the regression target, both in fp32
        (:func:`~camouflage_train.models.backbone.add_noise_fp32`: a bf16/fp16 backbone must not set the precision
        of this arithmetic). Cast the noisy latents to the UNet's dtype only at its input.

        Args:
            latents: the clean (scaled) latents.
            noise: the noise to add.
            timesteps: each sample's timestep.
        """
        latents, noise = latents.float(), noise.float()
        noisy = add_noise_fp32(self.noise_scheduler, latents, noise, timesteps)
        return noisy, self.prediction_target(latents, noise, timesteps)

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
        (places, hair colour) decides. The weighted per-sample losses are averaged over the batch, as in the paper
        and diffusers' training examples (``mean(w * l)``), so a sample's weight does not depend on the batch it
        is in, and a batch of one is weighted too.

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
        return (per_sample * self.min_snr_weights(timesteps, snr_gamma)).mean()

    def min_snr_weights(self, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
        """Min-SNR-gamma's weight of each timestep: ``min(SNR, gamma) / SNR`` for epsilon prediction,
        ``min(SNR, gamma) / (SNR + 1)`` for v-prediction.

        Args:
            timesteps: the timesteps.
            snr_gamma: gamma (> 0).
        """
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (or null for the plain loss), got {snr_gamma}")
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = snr.clamp(max=snr_gamma)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return weights / snr
        if prediction_type == "v_prediction":
            return weights / (snr + 1)
        raise ValueError(f"snr_gamma supports epsilon and v_prediction schedulers, not '{prediction_type}'")

    def warn_if_min_snr_does_nothing(self, snr_gamma: float | None, timesteps: tuple[int, int]) -> None:
        """Warn, naming both settings, when every Min-SNR weight over the training timesteps ``[low, high)`` is 1:
        then the loss is the plain MSE and ``snr_gamma`` does nothing.

        Args:
            snr_gamma: ``model.snr_gamma`` (``None``: nothing to check).
            timesteps: ``model.timestep_range`` as ``(low, high)``.
        """
        if snr_gamma is None:
            return
        weights = self.min_snr_weights(torch.arange(*timesteps), snr_gamma)
        if not torch.allclose(weights, torch.ones_like(weights)):
            return
        low, high = timesteps
        rank_zero_warn(
            f"model.snr_gamma={snr_gamma} has no effect with model.timestep_range=[{low}, {high}]: the signal-to-noise "
            f"ratio is at most {snr_gamma} at every timestep from {low} on (SNR({low}) = "
            f"{float(compute_snr(self.noise_scheduler, torch.tensor([low]))):.3g}), so every Min-SNR weight is 1 and "
            "the loss is the plain MSE. Set model.snr_gamma=null, or let "
            "model.timestep_range reach the low-noise timesteps where the weights differ"
        )
