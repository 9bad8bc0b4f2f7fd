"""Config validation, secrets, safe loading and output paths."""

import ast
import os
import subprocess
from pathlib import Path

import pytest
import torch

from camouflage_train.utils.checkpoint_io import AtomicCheckpointIO
from camouflage_train.utils.checkpoints import CheckpointError, read_checkpoint
from camouflage_train.utils.config_checks import ConfigError, validate_config
from camouflage_train.utils.paths import UnsafePathError, inside
from tests.conftest import REPO, run_script


def _train(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_script("train.py", *overrides, env=env)


@pytest.mark.slow
def test_bad_experiment_file_names_the_file_and_the_keys(tmp_path):
    extra = tmp_path / "configs"
    (extra / "experiment").mkdir(parents=True)
    bad = extra / "experiment" / "typo.yaml"
    bad.write_text(
        "# @package _global_\n"
        "defaults:\n  - demo\n"
        "data:\n  batch_size: eight\n"
        "model:\n  adapter:\n    tokens_per_persn: 2\n"
        "trainer:\n  max_step: 10\n"
    )
    done = _train(f"hydra.searchpath=[file://{extra}]", "experiment=typo", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode != 0
    for key, why in (
        ("data.batch_size", "'eight' is not a valid int"),
        ("model.adapter.tokens_per_persn", "unknown key for AdapterConfig"),
        ("trainer.max_step", "unknown key for lightning.pytorch.trainer.trainer.Trainer"),
    ):
        assert f"{bad}: {key}: {why}" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_shipped_experiment_validates(tmp_path):
    from hydra import compose, initialize_config_dir

    for experiment in sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")):
        primary = "evaluate.yaml" if experiment.startswith("eval_") else "train.yaml"
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose(primary, overrides=[f"paths.output_dir={tmp_path}", f"experiment={experiment}"])
        validate_config(cfg)


@pytest.mark.slow
def test_secrets_are_refused_in_configs_and_never_written(tmp_path, make_cfg, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"logger\.wandb\.api_key: looks like a secret"):
        validate_config(make_cfg("experiment=demo_tiny", "+logger.wandb.api_key=abc"))
    with pytest.raises(ConfigError, match=r"data\.train_source\.hf_token: looks like a secret"):
        validate_config(make_cfg("experiment=demo_tiny", "+data.train_source.hf_token=abc"))
    # Tokens in the environment (where they belong) appear in no log, saved config or W&B file.
    sentinel = "sk-camouflage-sentinel-3141592653"
    env = {**os.environ, "WANDB_API_KEY": sentinel, "HF_TOKEN": sentinel, "WANDB_MODE": "offline"}
    run = tmp_path / "run"
    done = _train(
        "experiment=demo_tiny", "trainer.max_steps=2", "trainer.limit_val_batches=0", f"hydra.run.dir={run}", env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sentinel not in done.stdout + done.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files)  # W&B wrote its offline run here
    assert not [p for p in files if sentinel.encode() in p.read_bytes()]


def test_every_torch_load_is_weights_only_and_no_remote_code():
    loads = []
    for path in (REPO / "camouflage_train").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func == "torch.load" or func.endswith(".load_from_checkpoint"):
                    kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    assert kwargs.get("weights_only") == "True", f"{path}:{node.lineno}"
                    loads.append(func)
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                raise AssertionError(f"{path}:{node.lineno} passes trust_remote_code")
    # The scan saw the package's one load (read_checkpoint, which export, resume and the Light pipeline use), so it
    # can fail; no Lightning load_from_checkpoint is left.
    assert loads == ["torch.load"], loads


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoints_load_weights_only(tmp_path, capsys):
    io = AtomicCheckpointIO()
    good = {"state_dict": {"w": torch.ones(2)}, "global_step": 1, "loops": {}, "optimizer_states": []}
    io.save_checkpoint(good, tmp_path / "good.ckpt")
    assert not list(tmp_path.glob(".*tmp*"))  # the staging file was renamed
    assert torch.equal(io.load_checkpoint(tmp_path / "good.ckpt")["state_dict"]["w"], torch.ones(2))
    torch.save({**good, "evil": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="holds pickled Python objects, which are never loaded") as error:
        read_checkpoint(tmp_path / "evil.ckpt")
    assert "weights_only=False" not in str(error.value)  # never suggest unsafe loading
    with pytest.raises(Exception, match=r"Unsupported global|Weights only load failed"):
        io.load_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=False"):
        io.load_checkpoint(tmp_path / "good.ckpt", weights_only=False)
    assert "pickled code ran" not in capsys.readouterr().out
    torch.save({"state_dict": {}}, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match=r"is not a training checkpoint of train\.py"):
        read_checkpoint(tmp_path / "partial.ckpt")


@pytest.mark.parametrize("name", ["../escape.png", "a/../../escape.png", "/etc/escape.png"])
def test_output_names_cannot_leave_their_folder(tmp_path, name):
    with pytest.raises(UnsafePathError, match="escapes"):
        inside(tmp_path / "images", name)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError):
        inside(tmp_path / "images", "link/escape.png")
    assert inside(tmp_path / "images", "sub/ok.png") == (tmp_path / "images" / "sub" / "ok.png").resolve()
    assert not list(Path(tmp_path).rglob("escape.png"))
