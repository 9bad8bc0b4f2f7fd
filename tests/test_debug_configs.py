"""The ``configs/debug/`` group: every file composes on top of an experiment, and the runs it makes work."""

from __future__ import annotations

import csv

import pytest

from camouflage_train.training import run_training
from tests.conftest import REPO

DEBUG = sorted(p.stem for p in (REPO / "configs" / "debug").glob("*.yaml") if p.stem != "default")


def test_the_debug_group_holds_the_usual_modes():
    assert DEBUG == ["fdr", "limit", "overfit", "profiler"]


@pytest.mark.parametrize("mode", DEBUG)
def test_each_debug_mode_composes_over_an_experiment(make_cfg, mode):
    cfg = make_cfg("experiment=demo_tiny", f"debug={mode}")
    assert cfg.task_name == "debug" and cfg.ckpt_path is None and cfg.data.num_workers == 0
    assert cfg.trainer.detect_anomaly is True and cfg.trainer.devices == 1
    assert cfg.logger.wandb is None and cfg.callbacks.preemption is None
    assert cfg.model.backbone.pretrained_model_name_or_path == "preset:tiny"  # the experiment is kept
    setting = {
        "fdr": ("fast_dev_run", True),
        "limit": ("max_steps", 6),
        "overfit": ("overfit_batches", 1),
        "profiler": ("max_steps", 20),
    }[mode]
    assert cfg.trainer[setting[0]] == setting[1]


def test_fast_dev_run_and_overfit_train(make_cfg, tmp_path, tiny_model_dir):
    """fast_dev_run: one step; overfit: the same batch every step (Lightning rebuilds the training loader with its
    own sampler, so there is no resumable position to checkpoint)."""
    metrics = run_training(make_cfg("experiment=demo_tiny", "debug=fdr", "data.batch_size=2"))
    assert "train/loss" in metrics and "val/loss" in metrics
    metrics = run_training(
        make_cfg("experiment=demo_tiny", "debug=overfit", "data.batch_size=2", "trainer.max_steps=4",
                 "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
                 "callbacks.model_checkpoint.every_n_train_steps=2")
    )  # fmt: skip
    assert "train/loss" in metrics
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("train/loss_step")) == 4
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
