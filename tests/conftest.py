"""Shared fixtures: offline environment, the tiny SD preset on disk, composed Hydra configs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("PROJECT_ROOT", str(REPO))
os.environ.setdefault("CAMOUFLAGE_CACHE", str(REPO / ".cache"))
# `make test` runs one pytest-xdist worker per core: each worker, and every script it starts, computes on one thread
# (two workers with two BLAS threads each on two cores would slow every test down).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from camouflage_train.data.schema import AttributeSchema  # noqa: E402
from camouflage_train.miniworld.scenes import FACE_ATTRIBUTES  # noqa: E402
from camouflage_train.models.presets import materialize_preset  # noqa: E402
from camouflage_train.utils.resolvers import register_resolvers  # noqa: E402
from tests.entry_points import EntryPointRun, run_entry_point  # noqa: E402

register_resolvers()

torch.set_num_threads(1 if WORKERS > 1 else min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heavy tests first, longest first: pytest-xdist's load scheduling deals the first tests round-robin, so
    they start on different workers at once instead of one of them ending the run alone."""
    order = {"test_a_short_light_run_on_the_mini_base_learns_places_and_attributes": 0}
    items.sort(key=lambda item: (item.get_closest_marker("heavy") is None, order.get(item.originalname, 1)))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return materialize_preset("tiny")


def compose_train(output_dir: Path, *overrides: str) -> DictConfig:
    """``configs/train.yaml`` composed with ``overrides``, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train.yaml", overrides=[f"paths.output_dir={output_dir}", *overrides])


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``configs/train.yaml`` with overrides, writing into ``tmp_path``."""
    return lambda *overrides: compose_train(tmp_path, *overrides)


@pytest.fixture
def demo_cfg(make_cfg: Callable[..., DictConfig]) -> DictConfig:
    return make_cfg("experiment=demo_tiny")


@pytest.fixture
def tiny_module(demo_cfg: DictConfig, tiny_model_dir: Path):
    return instantiate(demo_cfg.model)


@pytest.fixture
def schema() -> AttributeSchema:
    return AttributeSchema.from_config({**FACE_ATTRIBUTES, "max_persons": 3})


def person(box: list[float], age: float = 30.0, gender: str = "female", yaw: float = 10.0) -> dict:
    return {"box": box, "age": age, "gender": gender, "yaw": yaw, "pitch": -5.0, "roll": 3.0}


@pytest.fixture(scope="session")
def tiny_faces_dir() -> Path:
    from camouflage_train.stand_ins.face_pack import tiny_face_pack

    return Path(tiny_face_pack(os.environ["CAMOUFLAGE_CACHE"]))


@pytest.fixture(scope="session")
def group_photo() -> Path:
    """The real 6-person photo shipped inside the insightface package."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


def cpu_trainer(tmp_path: Path, **kwargs):
    """A quiet CPU Lightning Trainer writing under ``tmp_path`` (never the repository); ``kwargs`` override."""
    import lightning as L

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """(checkpoint path, module) after two demo training steps: trained once per test process and shared, so
    tests must only read the file (copy it to change it)."""
    folder = tmp_path_factory.mktemp("trained_checkpoint")
    cfg = compose_train(folder, "experiment=demo_tiny", "data.batch_size=2")
    with torch.random.fork_rng():  # the same weights whichever test asks first; its global RNG is left as it was
        torch.manual_seed(0)
        module = instantiate(cfg.model)
        trainer = cpu_trainer(folder, max_steps=2)
        trainer.fit(module, datamodule=instantiate(cfg.data))
    path = folder / "light.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def run_script(
    script: str, *overrides: str, env: dict | None = None, cwd: Path = REPO, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run a repository entry point (``train.py``, ``anonymize.py``, ...) in a process of its own, as a user would
    (forked from a server that has done the heavy imports; see :mod:`tests.entry_points`)."""
    return run_entry_point(REPO / script, list(overrides), cwd=cwd, env=env, timeout=timeout)


def start_script(script: str, *overrides: str, env: dict | None = None, cwd: Path = REPO) -> EntryPointRun:
    """:func:`run_script` without waiting: the started run, to wait for (``result``) or kill."""
    return EntryPointRun(REPO / script, list(overrides), cwd=cwd, env=env)


def assert_user_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, every fragment in the message, no Python traceback."""
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in output, (fragment, output[-3000:])


def assert_records_close(got, expected, rel: float = 1e-5, abs_: float = 1e-6, where: str = "") -> None:
    """Person records (JSON rows) equal, floats within a tolerance: a face pack run on another number of threads or
    processes may round its boxes, scores and angles differently in the last bits.

    Args:
        got: the rows (or one value) to check.
        expected: the reference.
        rel: relative tolerance of floats.
        abs_: absolute tolerance of floats.
        where: the path to the value, for the message.
    """
    if isinstance(expected, float) or isinstance(got, float):
        assert got == pytest.approx(expected, rel=rel, abs=abs_), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_records_close(got[key], expected[key], rel, abs_, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_records_close(a, b, rel, abs_, f"{where}[{i}]")
    else:
        assert got == expected, where
