import itertools
import json
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import REPO

SWEEPS = sorted((REPO / "configs" / "sweep").glob("*.yaml"))


def _points(parameters: dict) -> list[dict]:
    """Every grid point; for distributions, both ends of the range."""
    axes = {}
    for name, spec in parameters.items():
        axes[name] = spec["values"] if "values" in spec else [spec["min"], spec["max"]]
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_point_is_a_valid_override(path, make_cfg):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py" and "${args_no_hyphens}" in sweep["command"]
    assert sweep["metric"]["name"] in ("val/loss", "train/loss")
    fixed = [a for a in sweep["command"] if "=" in a and not a.startswith("$")]
    points = _points(sweep["parameters"])
    assert len(points) >= 2
    for point in points:
        cfg = make_cfg(*fixed, *(f"{k}={v}" for k, v in point.items()))
        for key, value in point.items():
            assert OmegaConf.select(cfg, key) == value, key


@pytest.mark.slow
def test_offline_multirun_over_adapter_sizes_writes_a_summary(tmp_path, tiny_model_dir):
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "-m",
            "experiment=demo_tiny",
            "model.adapter.tokens_per_person=1,2",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "data.val_source.num_samples=2",
            "data.batch_size=2",
            "model.validation.num_images=1",
            "logger=csv",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for run in ("0", "1"):
        assert (sweep_dir / run / "metrics.json").is_file() and (sweep_dir / run / "metrics.csv").is_file()
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["overrides"] for r in rows] == ["model.adapter.tokens_per_person=1", "model.adapter.tokens_per_person=2"]
    assert rows[0]["model/trainable_params"] < rows[1]["model/trainable_params"]
    assert all(isinstance(r["val/loss"], float) for r in rows)
    assert "| run | overrides |" in (sweep_dir / "summary.md").read_text()
