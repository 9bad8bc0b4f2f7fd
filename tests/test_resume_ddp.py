"""Crash/resume and multi-process training through the real ``train.py`` (subprocesses, CPU, gloo)."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import REPO, run_script

# Small and deterministic: 16 images, batch 2 -> 8 steps per epoch, so step 12 is in the second epoch and
# a kill after step 6 lands mid-epoch. Checkpoints every 3 steps, no validation (it never touches weights).
COMMON = (
    "experiment=demo_tiny",
    "logger=csv",
    "data.train_source.num_samples=16",
    "trainer.limit_val_batches=0",
    "trainer.deterministic=true",
    "callbacks.model_checkpoint.every_n_train_steps=3",
)


def _command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *COMMON, f"hydra.run.dir={run_dir}", *overrides]


def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``train.py`` as a user runs it, forked from the tests' server (imports done once)."""
    done = run_script("train.py", *_command(run_dir, *overrides)[2:])
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


RESUME_STEPS = ("trainer.max_steps=12", "data.batch_size=2")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir) -> Path:
    """An uninterrupted 12-step run (the reference for resuming, and checkpoints to corrupt)."""
    run = tmp_path_factory.mktemp("straight")
    _run(run, *RESUME_STEPS)
    return run


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir) -> Path:
    run = tmp_path_factory.mktemp("one")
    _run(run, "trainer.max_steps=4", "data.batch_size=4")
    return run


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, straight_run):
    steps = RESUME_STEPS
    expected = _adapter(straight_run / "checkpoints/last.ckpt")

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(
        _command(crashed, *steps), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = crashed / "checkpoints/step_0000006.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "checkpoints/step_0000012.ckpt").exists()

    start = time.perf_counter()
    _run(crashed, *steps)  # same command: ckpt_path=auto picks the newest loadable checkpoint
    print(f"resumed run took {time.perf_counter() - start:.1f} s")
    log = (crashed / "train.log").read_text()
    assert "resuming epoch 0 after" in log  # mid-epoch: the epoch is continued, not restarted
    assert not list((crashed / "checkpoints").glob(".*.tmp-*"))  # a save torn by the kill was cleaned up
    got = _adapter(crashed / "checkpoints/last.ckpt")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # metrics.csv is continued, not restarted: the same rows as the uninterrupted run's (the killed process's
    # rows after the checkpoint it resumed from are replaced by the resumed run's).
    straight_rows, crashed_rows = _csv(straight_run), _csv(crashed)
    assert [r["step"] for r in crashed_rows] == [r["step"] for r in straight_rows]
    # Per-step values agree; epoch means of a mid-epoch-resumed epoch cover only the batches after the resume
    # (Lightning does not checkpoint the running aggregate), so they are not compared.
    for mine, reference in zip(crashed_rows, straight_rows, strict=True):
        for key, value in reference.items():
            if value and key.startswith("train/") and not key.endswith("_epoch"):
                assert float(mine[key]) == pytest.approx(float(value), rel=1e-6), (key, mine["step"])


def _csv(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_as_slurm_tasks(run_dir: Path, *overrides: str) -> None:
    """Two tasks the way ``srun``/submitit starts them on two nodes: SLURM variables, one process each."""
    port, processes = _free_port(), []
    for rank in range(2):
        env = {
            **os.environ,
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "camouflage",
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_NNODES": "2",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(rank),
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        processes.append(
            subprocess.Popen(
                _command(run_dir, *overrides),
                cwd=REPO,
                env=env,
                stderr=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
            )
        )
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-4000:]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tmp_path, one_process_run):
    """Two SLURM tasks on two "nodes"; the launch where Lightning starts the second process itself (re-running
    train.py) is the streaming tests' (tests/test_streaming.py), with the same one-output-folder checks."""
    launch, steps = "slurm-2-nodes", ("trainer.max_steps=4",)
    ddp_dir = tmp_path / "two"
    _launch_as_slurm_tasks(ddp_dir, *steps, "data.batch_size=2", "trainer.strategy=ddp", "trainer.num_nodes=2")
    one, two = _adapter(one_process_run / "checkpoints/last.ckpt"), _adapter(ddp_dir / "checkpoints/last.ckpt")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"{launch}: largest |w_1proc - w_ddp| after 4 AdamW steps: {worst:.3g}")
    assert worst <= 1e-5
    # One output folder, written by rank 0 only: no second run folder, checkpoint set, config or metrics.
    assert [p.name for p in tmp_path.iterdir()] == ["two"]
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["last.ckpt", "step_0000003.ckpt"]
    assert len(list(ddp_dir.rglob(".hydra"))) == 1 and len(list(ddp_dir.glob("*.json"))) == 1  # metrics.json
    assert not (REPO / ".hydra").exists() and not (REPO / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path, straight_run, damage, caplog):
    from camouflage_train.utils.checkpoints import CheckpointError, resolve_checkpoint

    folder = tmp_path / "checkpoints"
    shutil.copytree(straight_run / "checkpoints", folder)
    for age, name in enumerate(["step_0000003", "step_0000006", "step_0000009", "step_0000012", "last"]):
        os.utime(folder / f"{name}.ckpt", (1000 + age, 1000 + age))  # written in this order
    last = folder / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    os.utime(last, (2000, 2000))
    assert resolve_checkpoint("auto", folder) == str(folder / "step_0000012.ckpt")
    assert "last.ckpt' is not a training checkpoint: it is unreadable" in caplog.text
    assert "moved to last.ckpt.corrupt; falling back to step_0000012.ckpt" in caplog.text
    assert not last.exists() and (folder / "last.ckpt.corrupt").is_file()  # out of the way of the next save
    with pytest.raises(CheckpointError, match=r"last\.ckpt\.corrupt' is not a training checkpoint"):
        resolve_checkpoint(folder / "last.ckpt.corrupt", folder)
    assert resolve_checkpoint("auto", tmp_path / "empty") is None
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        resolve_checkpoint("last", tmp_path / "empty")


def test_cluster_configs_compose_and_build(tmp_path):
    """The SLURM launcher (submitit) and the DDP/FSDP strategies resolve and construct (no cluster/GPU needed)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    overrides = [f"paths.output_dir={tmp_path}", "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides, return_hydra_config=True)
        fsdp = compose("train.yaml", overrides=[f"paths.output_dir={tmp_path}", "trainer=fsdp"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert isinstance(instantiate(cfg.trainer.strategy), DDPStrategy)
    assert isinstance(instantiate(fsdp.trainer.strategy), FSDPStrategy)


@pytest.mark.slow
def test_resume_after_corrupt_checkpoints_keeps_checkpoint_names(tmp_path, straight_run):
    """``last.ckpt`` and the newest ``step_N.ckpt`` torn: the rerun resumes from the one before, moves the torn
    files aside, and saves under the usual names again (no ``last-v1.ckpt``), ending where the straight run did."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    for name in ("last.ckpt", "step_0000012.ckpt"):
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:1000])
    _run(run, *RESUME_STEPS)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [
        "last.ckpt",
        "last.ckpt.corrupt",
        "step_0000003.ckpt",
        "step_0000006.ckpt",
        "step_0000009.ckpt",
        "step_0000012.ckpt",
        "step_0000012.ckpt.corrupt",
    ]
    expected = _adapter(straight_run / "checkpoints/last.ckpt")
    got = _adapter(run / "checkpoints/last.ckpt")
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.slow
def test_a_resumed_run_logs_to_the_same_wandb_run_and_continues_its_csv(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    common = ("logger=default", "trainer.log_every_n_steps=1", "data.batch_size=2")
    _run(run, *common, "trainer.max_steps=2")
    _run(run, *common, "trainer.max_steps=4")  # ckpt_path=auto resumes from step 2
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline
    steps = [r["step"] for r in _csv(run) if r.get("train/loss_step")]
    assert steps == ["0", "1", "2", "3"], steps
    assert json.loads((run / "metrics.json").read_text())["model/trainable_params"] > 0


def test_slurm_warning_signal_saves_a_checkpoint_and_the_requeued_run_continues_from_it(tmp_path, tiny_model_dir):
    """SIGUSR2 (sbatch --signal=USR2@<s>, the submitit launcher's signal_delay_s) to a CPU training process: it
    writes checkpoints/preempted.ckpt after the current step, asks SLURM to requeue the job (a stand-in
    `scontrol` records the call), and stops; the same command then resumes from that checkpoint."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run = tmp_path / "run"
    with (tmp_path / "first.log").open("w") as output:
        process = subprocess.Popen(
            _command(run, "trainer.max_steps=400", "data.batch_size=2"), cwd=REPO, env=env, stdout=output, stderr=output
        )
        marker, deadline = run / "checkpoints/step_0000003.ckpt", time.monotonic() + 300
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGUSR2)
        assert process.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    preempted = run / "checkpoints/preempted.ckpt"
    step = torch.load(preempted, map_location="cpu", weights_only=True)["global_step"]
    assert 3 <= step < 400
    assert calls.read_text().split() == ["requeue", "4242"]

    _run(run, f"trainer.max_steps={step + 2}", "data.batch_size=2")
    assert f"resuming from {preempted}" in (run / "train.log").read_text()
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == step + 2


class SignalAtStep(L.Callback):
    """Sends this process ``signal_name`` once, after optimizer step ``step``."""

    def __init__(self, step: int, signal_name: str = "SIGUSR2") -> None:
        self.step, self.signum, self.sent = step, signal.Signals[signal_name], False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def test_under_submitit_the_checkpoint_is_written_before_its_requeue_handler_runs(make_cfg, tmp_path, tiny_model_dir):
    """submitit installs its own SIGUSR2 handler (requeue, then exit): it must run after the checkpoint exists."""
    from camouflage_train.training import run_training

    seen: list[bool] = []
    preempted = tmp_path / "checkpoints" / "preempted.ckpt"

    def submitit_like(signum, frame) -> None:
        seen.append(preempted.is_file())

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        cfg = make_cfg(
            *COMMON,
            "trainer.max_steps=50",
            "+callbacks.signal._target_=tests.test_resume_ddp.SignalAtStep",
            "+callbacks.signal.step=2",
        )
        run_training(cfg)
        assert seen == [True]
        assert torch.load(preempted, map_location="cpu", weights_only=True)["global_step"] < 50
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # restored after training
    finally:
        signal.signal(signal.SIGUSR2, previous)
