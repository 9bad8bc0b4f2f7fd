"""CAMOUFLaGE-Light training: a person-attribute adapter on a frozen Stable Diffusion UNet.

Trainable: the :class:`~camouflage_train.models.attribute_encoder.AttributeEncoder`, the IP-Adapter
projection (``unet.encoder_hid_proj``) and the ``to_k_ip``/``to_v_ip`` of every cross-attention layer,
all kept in fp32. Frozen: VAE, text encoder, UNet, in ``backbone.weight_dtype``, always in eval mode.
Checkpoints hold only the trainable weights (plus optimizer/scheduler/loop state), so they are a few MB
and reload onto a freshly built backbone.

This module is the objective and the optimiser: ``setup`` (precision checks), ``training_step`` (with the
non-finite-loss stop), ``validation_step`` (seeded losses and the
:mod:`~camouflage_train.modules.conditioning_gains`), ``configure_optimizers``, ``on_train_start`` (parameter
counts), ``on_save_checkpoint`` / ``on_load_checkpoint`` (the format of
:mod:`~camouflage_train.models.adapter_checkpoint`), ``train`` (frozen parts stay in eval mode). Sample grids are
the :class:`~camouflage_train.callbacks.SampleGrids` callback's job.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.optim import Optimizer

from camouflage_train.data.sampling import Draw, draw_generator
from camouflage_train.data.schema import AttributeSchema
from camouflage_train.models.adapter_checkpoint import KEY as CHECKPOINT_KEY
from camouflage_train.models.adapter_checkpoint import adapter_metadata, check_trainable_keys, trainable_only
from camouflage_train.models.attribute_encoder import AttributeEncoder
from camouflage_train.models.backbone import load_frozen_backbone, parse_dtype
from camouflage_train.models.checkpointing import enable_checkpointing
from camouflage_train.models.compile import compile_unet as compile_frozen_unet
from camouflage_train.models.conditioning import PersonBatch, conditioning_inputs
from camouflage_train.models.ip_adapter import (
    AdapterConfig,
    cross_attention_keys,
    initial_state_dict,
    install_ip_adapter,
)
from camouflage_train.modules.conditioning_gains import conditioning_gains
from camouflage_train.modules.frozen_diffusion import FrozenDiffusionMixin
from camouflage_train.modules.schedules import with_schedule
from camouflage_train.utils.checkpoints import checkpoint_folder

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf losses ``nonfinite_patience`` times in a row."""


class StepNoise(NamedTuple):
    """The random numbers of one training step (see :meth:`LightAdapterModule._draw`).

    Args:
        drop_text: ``[B]`` bool on the host: the caption is dropped.
        drop_persons: ``[B]`` bool on the host: all persons are dropped.
        timesteps: ``[B]`` long.
        latent: ``[B, C, h, w]``: samples the VAE posterior.
        noise: ``[B, C, h, w]``: the diffusion noise.
        offset: ``[B, C, 1, 1]``: offset noise.
    """

    drop_text: torch.Tensor  # [B] bool, host
    drop_persons: torch.Tensor  # [B] bool, host
    timesteps: torch.Tensor  # [B] long
    latent: torch.Tensor  # [B, C, h, w]: samples the VAE posterior
    noise: torch.Tensor  # [B, C, h, w]
    offset: torch.Tensor  # [B, C, 1, 1]: offset noise


class LightAdapterModule(FrozenDiffusionMixin, L.LightningModule):
    """Train the Light adapter with the standard noise-prediction objective.

    Args:
        backbone: kwargs of :func:`~camouflage_train.models.backbone.load_frozen_backbone`.
        adapter: fields of :class:`~camouflage_train.models.ip_adapter.AdapterConfig` (the adapter size).
        schema: the attribute schema config (``max_persons``, ``continuous``, ``categorical``).
        optimizer: a partial optimizer taking the trainable parameters (Hydra ``_partial_: true``).
        lr_scheduler: ``{name, warmup_steps}`` for ``diffusers.optimization.get_scheduler``, or ``None``.
        text_dropout: probability of replacing a caption by "" (classifier-free guidance).
        attribute_dropout: probability of removing all persons of an image (the frozen SD is then the
            unconditional branch, exactly what sampling uses as the negative).
        noise_offset: offset-noise strength (0 disables).
        snr_gamma: Min-SNR-gamma loss weighting of training steps (``None``: the plain MSE; 5 is the paper's value).
        timestep_range: ``[low, high)``: training steps draw their timesteps there only (``None``: all of them).
            Places and attributes are decided at high noise; the lowest levels refine texture, so skipping them
            spends the steps where the adapter learns (validation losses keep every timestep).
        gradient_checkpointing: checkpoint the frozen UNet's blocks to save activation memory: ``true`` (all),
            ``high_res`` (only the full-resolution blocks: most of the saving for less recomputation) or ``false``.
        frozen_autocast: run a bf16/fp16 frozen backbone under the trainer's autocast instead of natively in
            its own dtype. Native (the default) skips autocast's fp32 group norms and per-op casts; the
            adapter keeps fp32 weights either way (see ``bench/train_step.py`` for the measured difference).
        channels_last: keep the UNet's weights and input in channels-last memory format (faster
            convolutions on tensor-core GPUs).
        compile_unet: ``torch.compile`` the frozen UNet in place (parameter names unchanged): ``false``,
            ``blocks`` (each repeated block on its own: fast to compile) or ``full`` / ``true`` (one graph).
        compile_options: ``torch.compile`` keyword arguments for ``compile_unet``, e.g. ``{mode: reduce-overhead}``
            (CUDA graphs: the adapter step's shapes are static, persons padded to ``max_persons``).
        batched_person_attention: all persons' region-masked adapter attention in one computation per layer
            (``false``: diffusers' loop of one attention call per person; the same result, see
            ``camouflage_train/models/person_attention.py``).
        nonfinite_patience: a step whose loss is NaN/inf is skipped (no backward; no weight or AdamW moment
            changes, though Lightning still counts the step) and counted in ``train/nonfinite_skipped``; this
            many in a row save ``nonfinite-stop.ckpt`` (the last good weights) and stop the run with
            :class:`NonFiniteLossError`.
        outside_region_loss_weight: in training, the loss weight of latent positions outside every person's region
            relative to those inside (1: the plain loss; with ``keep_background`` at inference only the regions
            are drawn, so a lower weight spends training where inference uses it). Images without persons keep
            equal weights; validation losses always do.
        conditioning_gains: log ``val/conditioning_gain`` and ``val/attribute_gain`` (see
            :mod:`~camouflage_train.modules.conditioning_gains`; each costs one more validation loss).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        adapter: AdapterConfig | Mapping[str, Any],
        schema: Mapping[str, Any],
        optimizer: Callable[[Iterable[torch.nn.Parameter]], Optimizer],
        lr_scheduler: Mapping[str, Any] | None = None,
        text_dropout: float = 0.05,
        attribute_dropout: float = 0.05,
        noise_offset: float = 0.0,
        snr_gamma: float | None = None,
        timestep_range: Sequence[int] | None = None,
        gradient_checkpointing: bool | str = False,
        frozen_autocast: bool = False,
        channels_last: bool = False,
        compile_unet: bool | str = False,
        compile_options: Mapping[str, Any] | None = None,
        batched_person_attention: bool = True,
        nonfinite_patience: int = 5,
        conditioning_gains: bool = True,
        outside_region_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        for name, p in (("text_dropout", text_dropout), ("attribute_dropout", attribute_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {p}")
        self.optimizer_factory = optimizer
        self.schema = AttributeSchema.from_config(schema)
        self.adapter_config = adapter if isinstance(adapter, AdapterConfig) else AdapterConfig(**adapter)
        self.weight_dtype = parse_dtype(backbone.get("weight_dtype", "fp32"))

        frozen = load_frozen_backbone(**backbone)
        self.backbone_name, self.backbone_source = frozen.name, frozen.source
        self.vae, self.text_encoder, self.unet = frozen.vae, frozen.text_encoder, frozen.unet
        self.tokenizer, self.noise_scheduler = frozen.tokenizer, frozen.noise_scheduler
        steps = self.noise_scheduler.config.num_train_timesteps
        self.all_timesteps: tuple[int, int] = (0, steps)  # what validation draws from
        bounds = self.all_timesteps if timestep_range is None else tuple(timestep_range)
        if len(bounds) != 2 or not all(isinstance(b, int) for b in bounds) or not 0 <= bounds[0] < bounds[1] <= steps:
            raise ValueError(f"model.timestep_range must be [low, high) with 0 <= low < high <= {steps}, got {bounds}")
        self.train_timesteps: tuple[int, int] = bounds
        self.warn_if_min_snr_does_nothing(snr_gamma, bounds)

        cfg = self.adapter_config
        self.encoder = AttributeEncoder.from_adapter_config(self.schema.to_config(), cfg)
        install_ip_adapter(
            self.unet, initial_state_dict(self.unet, cfg), scale=cfg.scale, batched_persons=batched_person_attention
        )
        enable_checkpointing(self.unet, gradient_checkpointing)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        compile_frozen_unet(self.unet, compile_unet, **dict(compile_options or {}))
        # Frozen weights are not in our checkpoints; on_load_checkpoint checks the trainable keys instead.
        self.strict_loading = False
        if not 0.0 <= outside_region_loss_weight <= 1.0:
            raise ValueError(f"model.outside_region_loss_weight must be in [0, 1], got {outside_region_loss_weight}")
        if nonfinite_patience < 1:
            raise ValueError(f"model.nonfinite_patience must be >= 1, got {nonfinite_patience}")
        self._nonfinite_streak = 0

    # ----------------------------------------------------------------------------------------- state
    def trainable_parameter_names(self) -> list[str]:
        """The names of the adapter's parameters (what a checkpoint holds)."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Only the trainable weights, and the description export and the pipelines read
        (:mod:`~camouflage_train.models.adapter_checkpoint`)."""
        checkpoint["state_dict"] = trainable_only(checkpoint["state_dict"], self.trainable_parameter_names())
        try:
            resolution = getattr(self.trainer.datamodule, "resolution", None)
        except RuntimeError:  # saved without a trainer attached
            resolution = None
        checkpoint[CHECKPOINT_KEY] = adapter_metadata(
            backbone_name=self.backbone_name,
            backbone_source=self.backbone_source,
            schema=self.schema.to_config(),
            adapter=self.adapter_config,
            ip_adapter_keys=cross_attention_keys(self.unet),
            resolution=resolution,
            hyperparameters=self.hparams,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable_keys(self.trainable_parameter_names(), checkpoint["state_dict"])

    # -------------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision.endswith("-true") and precision != "32-true":
            raise ValueError(
                f"trainer.precision={precision} would cast the trainable adapter to low precision; "
                "use bf16-mixed or 16-mixed (the adapter stays fp32, the frozen backbone uses backbone.weight_dtype)"
            )
        if self.weight_dtype != torch.float32 and self.hparams.frozen_autocast and "mixed" not in precision:
            raise ValueError(
                f"model.backbone.weight_dtype={self.weight_dtype} needs autocast: set trainer.precision to "
                "bf16-mixed or 16-mixed, or weight_dtype=fp32"
            )
        if self.weight_dtype == torch.float16 and precision != "16-mixed":
            raise ValueError(
                "model.backbone.weight_dtype=fp16 needs trainer.precision=16-mixed: gradients through a frozen "
                "fp16 UNet underflow without the loss scaling it brings"
            )

    def on_train_start(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        log.info("trainable parameters: %s, frozen: %s", f"{trainable:,}", f"{frozen:,}")
        if self.global_step > 0:  # a resumed run (the step is restored by now): its logs have them already
            return
        for logger in self.loggers:
            logger.log_metrics({"model/trainable_params": trainable, "model/frozen_params": frozen}, step=0)

    def _empty_text(self) -> torch.Tensor:
        """The frozen encoder's output for "" (text dropout on cached batches), computed once per device."""
        cached = getattr(self, "_empty_text_cache", None)
        if cached is None or cached.device != self.device:
            cached = self._empty_text_cache = self.encode_text([""])
        return cached

    def _frozen_compute(self) -> contextlib.AbstractContextManager:
        """Autocast off around the frozen backbone when it is stored in low precision (see ``frozen_autocast``)."""
        if self.weight_dtype == torch.float32 or self.hparams.frozen_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def _draw(
        self,
        batch: dict[str, Any],
        latent_shape: tuple[int, ...],
        generator: torch.Generator | None,
        timesteps: tuple[int, int],
    ) -> StepNoise:
        """Everything random in one step; timesteps uniform in ``[low, high)``; the normal draws in fp32.

        With ``batch["sample_seed"]`` (training batches from :class:`ResumableSampler`) and no ``generator``, each
        decision about each sample reads its own stream (:class:`~camouflage_train.data.sampling.Draw`), so the
        numbers do not depend on the batch composition, the rank layout or what ran before (a resumed run and a
        DDP run draw exactly what one uninterrupted process draws), and no two decisions share numbers (the
        caption drop is independent of the dataset's flip, of the person drop and of the noise). Otherwise they
        come, in a fixed order, from ``generator`` (validation) or the global RNG.
        """
        n, device = batch["person_mask"].shape[0], self.device
        low, high = timesteps
        seeds = batch.get("sample_seed") if generator is None else None
        channels = latent_shape[0]
        if seeds is not None:

            def per_sample(draw: Draw, sample: Callable[[torch.Generator], torch.Tensor], where: Any) -> torch.Tensor:
                return torch.stack([sample(draw_generator(s, draw, where)) for s in seeds])

            def normal(draw: Draw, shape: tuple[int, ...]) -> torch.Tensor:
                return per_sample(draw, lambda g: torch.randn(shape, generator=g, device=device), device)

            def uniform(draw: Draw) -> torch.Tensor:
                return per_sample(draw, lambda g: torch.rand((), generator=g), "cpu")

            drop_text, drop_persons = uniform(Draw.CAPTION_DROP), uniform(Draw.PERSON_DROP)
            drawn = per_sample(
                Draw.TIMESTEP, lambda g: torch.randint(low, high, (), generator=g, device=device), device
            )
            posterior, noise = normal(Draw.POSTERIOR, latent_shape), normal(Draw.NOISE, latent_shape)
            offset = normal(Draw.NOISE_OFFSET, (channels, 1, 1))
        else:
            where = generator.device if generator is not None else "cpu"
            drop_text, drop_persons = torch.rand((2, n), generator=generator, device=where).cpu()
            drawn = torch.randint(low, high, (n,), generator=generator, device=device)
            posterior, noise = torch.randn((2, n, *latent_shape), generator=generator, device=device)
            offset = torch.randn((n, channels, 1, 1), generator=generator, device=device)
        return StepNoise(
            drop_text=drop_text < self.hparams.text_dropout,
            drop_persons=drop_persons < self.hparams.attribute_dropout,
            timesteps=drawn,
            latent=posterior,
            noise=noise,
            offset=offset,
        )

    def diffusion_loss(
        self,
        batch: dict[str, Any],
        generator: torch.Generator | None = None,
        training: bool = False,
    ) -> torch.Tensor:
        """MSE between the UNet's prediction and the scheduler's target at uniform random timesteps.

        ``training`` gives the training objective: text/attribute dropout, ``timestep_range``, ``noise_offset``, the
        ``snr_gamma`` weighting and ``outside_region_loss_weight``. Validation leaves them all off, so its losses
        compare across those settings. The noise, the noisy latents and the target are fp32 whatever the backbone's
        dtype; only the UNet's input is cast to it.

        Takes raw batches (``pixel_values``, ``caption``) or cached ones (``latent_mean``/``latent_std``,
        ``text_embeds``); both use the same random numbers (:meth:`_draw`), so they give the same loss.

        Args:
            batch: a raw or cached batch.
            generator: seeded random numbers (validation); ``None``: per-sample seeds or the global RNG.
            training: the training objective (dropouts, ``timestep_range``, ``snr_gamma``).
        """
        cached = "latent_mean" in batch
        if cached:
            latent_shape = tuple(batch["latent_mean"].shape[1:])
        else:
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            height, width = batch["pixel_values"].shape[-2:]
            latent_shape = (self.vae.config.latent_channels, height // factor, width // factor)
        timesteps = self.train_timesteps if training else self.all_timesteps
        draw = self._draw(batch, latent_shape, generator, timesteps)
        person_mask = batch["person_mask"]
        drop_text = draw.drop_text if training else torch.zeros_like(draw.drop_text)
        if training:
            person_mask = person_mask & ~draw.drop_persons.to(person_mask.device)[:, None]
        persons = PersonBatch.from_batch(batch, person_mask)
        with torch.no_grad(), self._frozen_compute():
            if cached:
                mean = batch["latent_mean"].to(self.device, torch.float32)
                std = batch["latent_std"].to(self.device, torch.float32)
                text = batch["text_embeds"].to(self.device, self.text_encoder.dtype)
                if drop_text.any():
                    text = torch.where(drop_text.to(self.device)[:, None, None], self._empty_text(), text)
            else:
                pixels = batch["pixel_values"].to(self.device, self.vae.dtype)
                dist = self.vae.encode(pixels).latent_dist
                mean, std = dist.mean.float(), dist.std.float()
                captions = ["" if d else c for d, c in zip(drop_text.tolist(), batch["caption"], strict=True)]
                text = self.encode_text(captions)
        latents = (mean + std * draw.latent) * self.vae.config.scaling_factor  # fp32, like the noise below
        noise = draw.noise
        if training and self.hparams.noise_offset:  # validation keeps the plain objective
            noise = noise + self.hparams.noise_offset * draw.offset
        noisy, target = self.noisy_latents_and_target(latents, noise, draw.timesteps)
        expand = self.adapter_config.region_expand if self.adapter_config.region_masks else None
        embeds, masks = conditioning_inputs(
            self.encoder,
            persons,
            tuple(latents.shape[-2:]),
            expand,
            region_overlap=self.adapter_config.region_overlap,
            face_expand=self.adapter_config.face_expand,
        )
        with self._frozen_compute():
            prediction = self.unet(
                noisy.to(self.weight_dtype, memory_format=self.memory_format),
                draw.timesteps,
                encoder_hidden_states=text.to(self.weight_dtype),
                added_cond_kwargs={"image_embeds": [embeds.float()]},  # the fp32 projection
                cross_attention_kwargs={"ip_adapter_masks": [masks]},
            ).sample
        snr_gamma = self.hparams.snr_gamma if training else None
        outside = self.hparams.outside_region_loss_weight
        weights = None
        if training and outside != 1.0:
            regions = masks.amax(dim=1, keepdim=True)  # the union of the persons' regions (splitting keeps it)
            has_persons = persons.mask.any(dim=1).to(regions.dtype)[:, None, None, None]
            weights = has_persons * (outside + (1 - outside) * regions) + (1 - has_persons)
        return self.regression_loss(prediction, target, draw.timesteps, snr_gamma, pixel_weights=weights)

    def _log_skipped(self, batch: dict[str, Any], stage: str) -> None:
        skipped = float(sum(batch.get("skipped", {}).values()))
        self.log(f"data/{stage}_skipped", skipped, on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._log_skipped(batch, "train")
        if batch.get("size", 1) == 0:
            return None  # every sample of this batch was unusable (counted above); no optimizer step
        loss = self.diffusion_loss(batch, training=True)
        batch_size = batch["person_mask"].shape[0]
        # One decision for all ranks (a rank skipping alone would hang DDP's gradient all-reduce).
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        self.log(
            "train/nonfinite_skipped", float(not finite), on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1
        )
        if not finite:
            return self._skip_nonfinite(loss)
        self._nonfinite_streak = 0
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log(
            "data/persons_dropped",
            batch["persons_dropped"].sum().float(),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            batch_size=batch_size,
        )
        return loss

    def _skip_nonfinite(self, loss: torch.Tensor) -> None:
        """Skip this step; after ``nonfinite_patience`` in a row, save the (untouched) weights and stop."""
        self._nonfinite_streak += 1
        patience = self.hparams.nonfinite_patience
        log.warning(
            "non-finite loss %s at step %d (%d in a row, stop at %d): step skipped",
            loss.item(),
            self.global_step,
            self._nonfinite_streak,
            patience,
        )
        if self._nonfinite_streak < patience:
            return None
        path = checkpoint_folder(self.trainer, Path(self.trainer.default_root_dir)) / "nonfinite-stop.ckpt"
        self.trainer.save_checkpoint(path)  # every rank calls it (it synchronises); rank 0 writes
        raise NonFiniteLossError(
            f"{patience} consecutive non-finite losses up to step {self.global_step}; the last good state is in "
            f"'{path}'. Lower model.optimizer.lr, check trainer.precision (fp16 overflows) and the data "
            "(data/train_skipped), then resume with ckpt_path=<that file>"
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_skipped(batch, "val")
        if batch.get("size", 1) == 0:
            return
        size = batch["person_mask"].shape[0]
        losses = self.validation_losses(batch, batch_idx)
        for name, value in losses.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", on_epoch=True, batch_size=size, sync_dist=True)

    def validation_losses(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """``loss`` and, unless ``conditioning_gains`` is off, the gains of
        :mod:`~camouflage_train.modules.conditioning_gains`, all at the same noise and timesteps (seeded per batch,
        so all move only when the adapter does).

        Args:
            batch: a validation batch.
            batch_idx: its index (the seed).
        """
        seed = 10_000 + batch_idx

        def loss_of(sample: dict[str, Any]) -> torch.Tensor:
            return self.diffusion_loss(sample, generator=torch.Generator(device=self.device).manual_seed(seed))

        losses = {"loss": loss_of(batch)}
        if self.hparams.conditioning_gains:
            losses.update(conditioning_gains(loss_of, batch, losses["loss"]))
        return losses

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        return with_schedule(optimizer, self.hparams.lr_scheduler, lambda: self.trainer.estimated_stepping_batches)
