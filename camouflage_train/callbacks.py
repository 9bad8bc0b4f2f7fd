"""Lightning callbacks of the framework."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L

from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.pipelines.light import build_pipeline, generate_light
from camouflage_train.pipelines.sampling import SAMPLING
from camouflage_train.utils.images import save_sample_grid

log = logging.getLogger(__name__)


class SampleGrids(L.Callback):
    """At every validation, generate from the first validation batch's persons and captions with the adapter
    being trained; save ``samples/step_<step>.png`` (real | generated) in the run folder and log it to loggers
    that take images (W&B).

    Runs on the main process only, for modules with a Light adapter (it does nothing for others). Each image
    uses ``seed + i``, so grids of one run compare across steps.

    Args:
        num_images: images per grid (0 switches the grids off).
        num_inference_steps: sampler steps (default: :data:`~camouflage_train.pipelines.sampling.SAMPLING`'s).
        guidance_scale: classifier-free guidance scale (default: ``SAMPLING``'s).
        seed: the first image's seed.
    """

    def __init__(
        self,
        num_images: int = 4,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        self.num_images, self.seed = num_images, seed
        self.num_inference_steps = SAMPLING.num_inference_steps if num_inference_steps is None else num_inference_steps
        self.guidance_scale = SAMPLING.guidance_scale if guidance_scale is None else guidance_scale

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if not hasattr(pl_module, "adapter_config") or batch.get("size", 1) == 0:
            return
        count = min(self.num_images, batch["pixel_values"].shape[0])
        if count <= 0:
            return
        grid_images = self.generate(pl_module, batch, count)  # generate_light runs without gradients
        path = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:07d}.png"
        grid = save_sample_grid(batch["pixel_values"][:count], grid_images, path)
        caption = ["real | generated"]
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/samples", images=[grid], step=trainer.global_step, caption=caption)

    def generate(self, module: L.LightningModule, batch: dict[str, Any], count: int) -> list[Any]:
        """``count`` images from ``batch``'s first persons and captions with ``module``'s frozen parts and adapter.

        Args:
            module: a :class:`~camouflage_train.modules.light_module.LightAdapterModule`.
            batch: a validation batch.
            count: how many of its images.
        """
        persons = PersonBatch.from_batch(batch)[:count]
        height, width = batch["pixel_values"].shape[-2:]
        pipe = build_pipeline(
            module.vae, module.text_encoder, module.tokenizer, module.unet, module.noise_scheduler.config
        )
        return generate_light(
            pipe,
            module.encoder,
            module.adapter_config,
            persons,
            list(batch["caption"][:count]),
            height,
            width,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
        )


class DataHealthMonitor(L.Callback):
    """Report unusable samples once per epoch and stop a run that only sees unusable data.

    Sources count rows left out up front (``source.skipped``); the collate function counts samples skipped
    while loading (``batch["skipped"]``). Both are logged as ``data/skipped`` and summarised by reason at
    the end of each epoch. ``max_consecutive_empty`` batches in a row with no usable sample raise an error.

    Args:
        max_consecutive_empty: training batches in a row with no usable sample before the run stops.
    """

    def __init__(self, max_consecutive_empty: int = 20) -> None:
        self.max_consecutive_empty = max_consecutive_empty
        self.epoch_skipped: Counter[str] = Counter()
        self.epoch_used = 0
        self.consecutive_empty = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        for name in ("train_source", "val_source"):
            skipped = getattr(getattr(datamodule, name, None), "skipped", None)
            if skipped:
                log.warning("%s: %d row(s) left out before training: %s", name, sum(skipped.values()), dict(skipped))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        skipped = batch.get("skipped", {}) if isinstance(batch, dict) else {}
        self.epoch_skipped.update(skipped)
        size = int(batch.get("size", 1)) if isinstance(batch, dict) else 1
        self.epoch_used += size
        self.consecutive_empty = self.consecutive_empty + 1 if size == 0 else 0
        if self.consecutive_empty >= self.max_consecutive_empty:
            raise RuntimeError(
                f"{self.consecutive_empty} consecutive training batches had no usable sample "
                f"(skipped this epoch by reason: {dict(self.epoch_skipped)}); check the dataset"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epoch_skipped:
            log.warning(
                "epoch %d: used %d samples, skipped %d: %s",
                trainer.current_epoch,
                self.epoch_used,
                sum(self.epoch_skipped.values()),
                dict(self.epoch_skipped),
            )
        if self.epoch_used == 0 and self.epoch_skipped:
            raise RuntimeError(f"no usable training sample in a whole epoch: {dict(self.epoch_skipped)}")
        self.epoch_skipped.clear()
        self.epoch_used = 0


class ExportAdapter(L.Callback):
    """Opt-in: at the end of training, write the export folder (see :mod:`camouflage_train.export`) from the
    final weights. Only rank 0 writes.

    Args:
        output: the export folder.
        enabled: whether to export at all.
        base_model: refuse to export unless the adapter was trained on this base (``None``: any).
        overwrite: replace an earlier export in ``output``.
    """

    def __init__(
        self, output: str, enabled: bool = False, base_model: str | None = None, overwrite: bool = False
    ) -> None:
        self.output, self.enabled, self.base_model, self.overwrite = output, enabled, base_model, overwrite

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        import tempfile
        from pathlib import Path

        from camouflage_train.export import export_adapter

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(tmp) / "final.ckpt"
            trainer.save_checkpoint(checkpoint)  # collective: every rank calls it
            if trainer.is_global_zero:
                export_adapter(checkpoint, self.output, base_model=self.base_model, overwrite=self.overwrite)
                log.info("exported the adapter to %s", self.output)


class PreemptionCheckpoint(L.Callback):
    """Save a checkpoint when the cluster announces the job's end with a signal, then let the job be requeued.

    SLURM sends ``--signal=USR2@<seconds>`` before a pre-emption or the time limit (the submitit launcher's
    ``signal_delay_s``, ``configs/hydra/launcher/slurm.yaml``). submitit's own handler for that signal requeues the
    job and exits at once, and Lightning's auto-requeue does not install itself over an existing handler, so
    without this callback the requeued job resumed from the last periodic checkpoint (up to
    ``every_n_train_steps`` lost). Here the handler only notes the signal; at the end of the current training
    batch every rank agrees (one reduce), ``checkpoints/preempted.ckpt`` is written (atomically, all ranks
    taking part), and then the previous handler runs (submitit: requeue and exit), or, in a plain ``sbatch``
    job, rank 0 calls ``scontrol requeue $SLURM_JOB_ID``; training then stops. ``ckpt_path=auto`` resumes
    from that checkpoint when the requeued job starts.

    Args:
        signal_name: the signal's name (``SIGUSR2``, ``SIGUSR1``, ``SIGTERM``).
        filename: the checkpoint's file name in the checkpoint folder.
    """

    def __init__(self, signal_name: str = "SIGUSR2", filename: str = "preempted.ckpt") -> None:
        import signal

        self.signum = signal.Signals[signal_name]
        self.filename = filename
        self.received = False
        self._previous: Any = None
        self._installed = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: not in the main thread; %s is not handled", self.signum.name)
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._note)
        self._installed = True

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        received = self.received
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        from pathlib import Path

        from camouflage_train.utils.checkpoints import checkpoint_folder

        path = checkpoint_folder(trainer, Path(trainer.default_root_dir) / "checkpoints") / self.filename
        trainer.save_checkpoint(path)  # collective: every rank calls it
        log.warning(
            "%s received: saved %s at step %d; the requeued job resumes from it (ckpt_path=auto)",
            self.signum.name,
            path,
            trainer.global_step,
        )
        trainer.should_stop = True
        self.received = False
        self._requeue(trainer)

    def _requeue(self, trainer: L.Trainer) -> None:
        import os
        import signal
        import subprocess

        self.teardown(trainer, trainer.lightning_module, "fit")
        previous = self._previous
        if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler):
            previous(self.signum, None)  # submitit: requeues the job (rank 0) and exits
        elif trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
            try:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
                outcome = "requeued" if done.returncode == 0 else f"requeue failed: {done.stderr.strip()}"
            except (OSError, subprocess.TimeoutExpired) as error:
                outcome = f"requeue failed: {error}"
            log.warning("SLURM job %s %s", job, outcome)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import signal

        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
