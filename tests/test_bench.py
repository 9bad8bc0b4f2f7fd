"""The benchmark scripts run end to end on the tiny preset (numbers are not checked, their shape is)."""

import json

import pytest

from tests.conftest import REPO
from tests.entry_points import run_entry_point

pytestmark = pytest.mark.slow  # each runs a benchmark script in a process of its own


def _run(script: str, *args: str, tmp_path) -> dict:
    out = tmp_path / "result.json"
    done = run_entry_point(REPO / "bench" / script, [*args, "--out", str(out)], cwd=REPO, env=None, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == result  # the last stdout line is the result
    return result


def test_train_step_bench_rows_and_ratios(tmp_path, tiny_model_dir):
    result = _run(
        "train_step.py",
        *("--modes", "fp32", "fp32-cached", "--batch-sizes", "2", "--steps", "1", "--warmup", "1"),
        tmp_path=tmp_path,
    )
    online, cached = result["rows"]
    assert (online["mode"], cached["mode"]) == ("fp32", "fp32-cached")
    for row in (online, cached):
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and row["peak_mem_gib"] > 0
    # The cached step skips the VAE encoder and the text encoder: fewer FLOPs, counted, not assumed.
    assert 0 < cached["tflop_per_step"] < online["tflop_per_step"]
    assert set(result["ratios"]) == {"cached_over_online_fp32@2"}


def test_framework_overhead_bench(tmp_path, tiny_model_dir):
    result = _run("framework_overhead.py", *("--batch-size", "2", "--steps", "2", "--rounds", "1"), tmp_path=tmp_path)
    assert result["lightning_over_bare"] > 0 and result["steps_timed"] == 2
    assert result["bare_step_s_median"] > 0 and result["lightning_step_s_median"] > 0


def test_inference_ratio_times_each_method_at_its_configured_operating_point(tmp_path, tiny_model_dir):
    from omegaconf import OmegaConf

    result = _run("inference_ratio.py", "--batch", "2", "--repeats", "1", "--structure-controlnets", "2",
                  tmp_path=tmp_path)  # fmt: skip
    base = OmegaConf.load(REPO / "configs/anonymize/model/base_tiny.yaml")
    light = OmegaConf.load(REPO / "configs/anonymize/model/light_tiny.yaml")
    points = result["operating_points"]
    for key in ("num_inference_steps", "guidance_scale", "strength"):
        assert points["base"][key] == base[key]
    for key in ("num_inference_steps", "guidance_scale", "scheduler", "keep_background"):
        assert points["light"][key] == light[key]
    assert result["base_s_per_image"] > 0 and result["light_s_per_image"] > 0
    equal = _run("inference_ratio.py", "--batch", "2", "--repeats", "1", "--steps", "2", tmp_path=tmp_path)
    assert equal["operating_points"]["base"]["strength"] is None
    assert equal["operating_points"]["light"]["num_inference_steps"] == 2
