"""End to end: config composition, a tiny train+validate run, the CLI's offline error."""

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from camouflage_train.evaluation import expand_sweep
from camouflage_train.models.backbone import BackboneUnavailableError
from camouflage_train.training import run_training
from tests.conftest import REPO

EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(make_cfg, experiment, tmp_path):
    if experiment.startswith("eval_"):  # evaluation experiments belong to evaluate.yaml
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose(
                "evaluate.yaml",
                overrides=[f"experiment={experiment}", f"paths.output_dir={tmp_path}", "light_checkpoint=x.ckpt"],
            )
        resolved = OmegaConf.to_container(cfg, resolve=True)
        anonymizers = resolved["anonymizers"]
        assert (
            resolved["rows"][:5] == ["identity", "reconstruction", "blur", "base", "light"]
            and anonymizers["light"]["checkpoint"] == anonymizers["no_adapter"]["checkpoint"] == "x.ckpt"
        )
        assert anonymizers["reconstruction"]["backbone"] == anonymizers["base"]["backbone"]  # the base's own VAE
        for row in resolved["rows"]:  # every row is an anonymizer built from its _target_
            assert "_target_" in anonymizers[row], row
        for group in ("data", "trainer", "faces"):
            assert "_target_" in resolved[group], group
        expand_sweep(cfg)  # every swept key exists in its row
        assert all("_target_" in cfg.anonymizers[row] for row in cfg.rows)
        return
    cfg = make_cfg(f"experiment={experiment}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task_name"] == experiment
    for group in ("model", "data", "trainer"):
        assert "_target_" in resolved[group], group
    if resolved["model"]["_target_"].endswith("LightAdapterModule"):
        assert resolved["model"]["schema"] == resolved["attributes"]


def test_light_celebahq_uses_real_sd15_at_512_bf16(make_cfg):
    cfg = make_cfg("experiment=light_celebahq")
    assert cfg.model.backbone.pretrained_model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.data.resolution == 512 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.backbone.weight_dtype == "bf16"
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg.model)
    assert isinstance(err.value.__cause__, BackboneUnavailableError)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(err.value.__cause__)


def test_demo_data_instantiates(demo_cfg):
    dm = instantiate(demo_cfg.data)
    dm.setup("fit")
    assert len(dm.train_set) == demo_cfg.data.train_source.num_samples


@pytest.mark.slow
def test_tiny_train_and_validate_run(make_cfg, tmp_path, tiny_model_dir):
    cfg = make_cfg(
        "experiment=demo_tiny",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "data.val_source.num_samples=4",
        "data.batch_size=2",
    )
    metrics = run_training(cfg)
    assert {"train/loss", "val/loss"} <= set(metrics)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["step"] for r in rows if r.get("val/loss")] == ["1", "3"]
    assert [r["step"] for r in rows if r.get("val/conditioning_gain")] == ["1", "3"]  # logged at every validation
    assert sum(1 for r in rows if r.get("train/loss_step")) >= 1
    assert (tmp_path / "samples" / "step_0000004.png").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.json").is_file()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_cli_light_celebahq_fails_fast_offline(tmp_path):
    """With its person records in place, the next thing light_celebahq needs is SD 1.5: offline, one message."""
    (tmp_path / "celebahq").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "celebahq" / f"persons_{split}.jsonl").touch()
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "experiment=light_celebahq",
            f"paths.log_dir={tmp_path}",
            f"paths.data_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Cannot load Stable Diffusion weights 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in output
    assert "model.backbone.pretrained_model_name_or_path=<folder>" in output
    assert elapsed < 120, elapsed
    assert not list(Path(tmp_path).rglob("*.ckpt"))


def test_wandb_goes_offline_without_key_or_server(monkeypatch, tmp_path):
    from camouflage_train.utils.loggers import resolve_wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on loopback port 9
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("online") == "online"
