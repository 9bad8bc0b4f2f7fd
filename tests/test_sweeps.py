import json
import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import REPO, run_script

SWEEPS = sorted((REPO / "configs" / "sweep").glob("*.yaml"))


def _points(parameters: dict) -> list[dict]:
    """Every value of every axis (for distributions, both ends of the range), the other axes at their first value.
    The overrides name distinct keys, so a value that composes here composes in any combination."""
    axes = {}
    for name, spec in parameters.items():
        axes[name] = spec["values"] if "values" in spec else [spec["min"], spec["max"]]
    first = {name: values[0] for name, values in axes.items()}
    return [first] + [{**first, name: value} for name, values in axes.items() for value in values[1:]]


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
    result = run_script(
        "train.py",
        *[
            "-m",
            "experiment=demo_tiny",
            "model.adapter.tokens_per_person=1,2",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "data.val_source.num_samples=2",
            "data.batch_size=2",
            "callbacks.sample_grids.num_images=1",
            "logger=csv",
            f"hydra.sweep.dir={sweep_dir}",
        ],
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


def _fake_evaluation_multirun(sweep, runs: dict[str, list[dict]]) -> None:
    """A multirun folder as `evaluate.py -m` leaves it: per job its overrides and results.json."""
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}\n")
    for number, (override, rows) in enumerate(runs.items()):
        (sweep / str(number) / ".hydra").mkdir(parents=True)
        (sweep / str(number) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["rows=[base]", override]))
        (sweep / str(number) / "results.json").write_text(json.dumps(rows))


def _row(model, rank1, edge, detection=0.95, ssim=0.7):
    return {"model": model, "reid/r/rank1": rank1, "reid/r/rank1_se": 0.01, "reid/r/detection_rate": detection,
            "struct/edge_iou": edge, "struct/ssim": ssim, "fid": 0.1}  # fmt: skip


def test_an_evaluation_multirun_summary_has_one_line_per_run_and_row(tmp_path):
    from camouflage_train.utils.sweep_summary import MultirunSummary

    sweep = tmp_path / "sweep"
    _fake_evaluation_multirun(
        sweep,
        {"s=0.3": [_row("base@g=0", 0.4, 0.6), _row("base@g=1", 0.1, 0.5)], "s=0.5": [_row("base@g=0", 0.3, 0.6)]},
    )
    (sweep / "2" / ".hydra").mkdir(parents=True)  # a job that failed: Hydra wrote its overrides, it wrote nothing
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["rows=[base]", "s=0.9"]))
    MultirunSummary(["reid/*/rank1", "struct/edge_iou", "val/loss"]).on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    )
    lines = json.loads((sweep / "summary.json").read_text())
    assert [(line["run"], line["row"], line["overrides"]) for line in lines] == [
        ("0", "base@g=0", "s=0.3"), ("0", "base@g=1", "s=0.3"), ("1", "base@g=0", "s=0.5"), ("2", "", "s=0.9")
    ]  # fmt: skip
    assert lines[1]["reid/r/rank1"] == 0.1 and "reid/r/rank1_se" not in lines[1]  # the pattern, not its _se
    assert lines[0]["val/loss"] == "n/a" and lines[3]["struct/edge_iou"] == "failed"


def test_the_operating_point_is_the_largest_feasible_privacy_fall_and_the_weakest_setting_among_ties(tmp_path):
    from camouflage_train.metrics.operating_point import main

    sweep = tmp_path / "sweep"
    _fake_evaluation_multirun(
        sweep,
        {
            "strength=0.3": [
                _row("identity", 1.0, 1.0),  # outside any sweep: never a candidate
                _row("base@guidance=0", 0.40, 0.60),
                _row("base@guidance=1", 0.105, 0.52),  # fall 0.295, within the tie of 0.30: weaker setting wins
                _row("base@guidance=2", 0.00, 0.45),  # fall 0.40 but structure falls 0.15
            ],
            "strength=0.5": [
                _row("base@guidance=0", 0.40, 0.60),
                _row("base@guidance=2", 0.10, 0.55),  # fall 0.30
                _row("base@guidance=3", 0.00, 0.58, detection=0.5),  # fall 0.40, faces lost
            ],
            "strength=0.9": [_row("base@guidance=0", 0.5, 0.6, ssim=0.3), _row("base@guidance=1", 0.0, 0.6)],
        },
    )
    chosen = main([str(sweep)])
    assert (chosen.run, chosen.row) == ("strength=0.3", "base@guidance=1")
    assert chosen.privacy_fall == pytest.approx(0.295) and chosen.structure_fall == pytest.approx(0.08)
    report = json.loads((sweep / "operating_point.json").read_text())
    why = {(c["run"], c["row"]): c["infeasible"] for c in report["candidates"]}
    assert len(why) == 5 and why[("strength=0.5", "base@guidance=2")] == ""
    assert "struct/edge_iou falls 0.150" in why[("strength=0.3", "base@guidance=2")]
    assert "detection 0.500" in why[("strength=0.5", "base@guidance=3")]
    assert "reference struct/ssim 0.300" in why[("strength=0.9", "base@guidance=1")]
    assert main([str(sweep), "--tie", "0"]).row == "base@guidance=2"  # no tie: the largest fall, 0.30
    assert main([str(sweep), "--max-structure-fall", "0.01"]) is None


def test_a_privacy_bound_over_the_floor_and_utility_limits_make_candidates_infeasible(tmp_path):
    """The worst-case attacker's rank-1 must stay within the margin over the row's floor; a utility limit is a hard
    bound; with the reference included, a reference inside every bound can win."""
    from camouflage_train.metrics.operating_point import main

    def row(model, worst, floor, iou, edge=0.5):
        return {**_row(model, 0.0, edge), "attack/worst/other_view/rank1": worst,
                "attack/floor/other_view/rank1": floor, "attr/box_iou": iou}  # fmt: skip

    sweep = tmp_path / "sweep"
    _fake_evaluation_multirun(
        sweep,
        {
            "steps=4": [
                row("light@cfg=2", 0.05, 0.03, 0.6),  # reference: inside the bound (0.05 <= 0.03 + 0.03)
                row("light@cfg=3", 0.04, 0.03, 0.4),  # the most private, but boxes lost
                row("light@cfg=6", 0.07, 0.03, 0.7),  # above the floor by 0.04
            ]
        },
    )
    flags = ["--privacy", "attack/worst/other_view/rank1", "--floor", "attack/floor/other_view/rank1"]
    flags += ["--max-above-floor", "0.03", "--limit", "attr/box_iou>=0.5", "--tie", "0", "--absolute"]
    assert main([str(sweep), *flags]) is None  # without the reference, no candidate passes
    chosen = main([str(sweep), *flags, "--include-reference"])
    assert chosen.row == "light@cfg=2" and chosen.privacy == pytest.approx(0.05)
    why = {c["row"]: c["infeasible"] for c in json.loads((sweep / "operating_point.json").read_text())["candidates"]}
    assert "attr/box_iou 0.400 not >= 0.5" in why["light@cfg=3"]
    assert "0.070 > floor 0.030 + 0.03" in why["light@cfg=6"]
    with pytest.raises(ValueError, match="expected KEY>=NUMBER"):
        main([str(sweep), "--limit", "attr/box_iou>0.5"])


RUN_DIR = """
import camouflage_train.cli  # registers the resolvers, as every entry point does
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
with initialize_config_dir(config_dir=r"{configs}", version_base="1.3"):
    cfg = compose("train.yaml", overrides=["experiment=demo_tiny"], return_hydra_config=True)
print(OmegaConf.select(cfg, "hydra.run.dir"))
"""


@pytest.mark.parametrize("run_ids", [(None, None), ("abc123", "def456")], ids=["plain", "wandb-agents"])
def test_runs_started_in_the_same_second_get_their_own_folders(run_ids):
    """Two sweep agents starting at once: before, both resolved to logs/<task>/runs/<same second> and the second
    resumed from the first's checkpoints (ckpt_path=auto)."""
    script = RUN_DIR.format(configs=REPO / "configs")
    started = []
    for run_id in run_ids:
        env = {k: v for k, v in os.environ.items() if k != "WANDB_RUN_ID"}
        if run_id:
            env["WANDB_RUN_ID"] = run_id
        started.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True))
    folders = [process.communicate(timeout=120)[0].strip() for process in started]
    assert all(process.returncode == 0 for process in started)
    assert folders[0] != folders[1], folders
    if run_ids[0]:
        assert [folder.rsplit("_", 1)[1] for folder in folders] == list(run_ids)
