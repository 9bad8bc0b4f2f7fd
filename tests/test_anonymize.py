import json
import os
import shutil
import stat
import time

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from camouflage_train.anonymization import run_anonymization
from camouflage_train.data.synthetic import draw_scene
from camouflage_train.utils.config_checks import ConfigError
from tests.conftest import REPO, assert_records_close, assert_user_error, run_script, start_script

# Batched and single-image generation run different kernels (BLAS blocking, thread splits), so the same image
# made in another batch may differ in the last bit, which can flip an 8-bit rounding. Measured on the tiny
# models (4 steps, fp32, 2-core AMD EPYC): at most 1 level, in under 0.01 % of the values. Asserted with room:
BATCH_TOLERANCE_MAX, BATCH_TOLERANCE_MEAN = 3, 0.05  # 8-bit levels


@pytest.fixture
def mixed_folder(tmp_path, schema, group_photo):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        draw_scene(i, schema, 96)[0].save(folder / f"syn_{i}.png")
    Image.open(group_photo).resize((320, 221)).save(folder / "sub" / "group.jpg")
    frames = [draw_scene(10 + i, schema, 96)[0] for i in range(2)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    (folder / "broken.jpg").write_bytes(b"")
    data = (folder / "sub" / "group.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    return folder


# Two processes on the CPU (gloo), as `trainer=ddp trainer.devices=8` runs one per GPU.
TWO_PROCESSES = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")


def _arguments(folder, out, *overrides):
    return (
        "faces=mini",
        "bodies=none",
        "resolution=64",
        "num_workers=0",
        f"input.folder={folder}",
        f"output={out}",
        f"hydra.run.dir={out.parent / ('run_' + out.name)}",
        *overrides,
    )


def _anonymize(folder, out, *overrides):
    return run_script("anonymize.py", *_arguments(folder, out, *overrides))


def _manifest(out):
    return {r["file"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.slow
def test_base_anonymizes_a_mixed_folder_resumes_and_is_batch_independent(mixed_folder, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        done = _anonymize(mixed_folder, out, "model=base_tiny")
    finally:
        os.umask(previous)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _manifest(out)
    assert set(rows) == {
        "syn_0.png",
        "syn_1.png",
        "syn_2.png",
        "sub/group.jpg",
        "anim.gif",
        "broken.jpg",
        "truncated.jpg",
        "tiny.png",
    }
    assert rows["broken.jpg"]["reason"] == "annotation: empty file"
    assert rows["truncated.jpg"]["reason"] == "annotation: corrupt image"
    assert rows["tiny.png"]["reason"] == "annotation: too small"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 5 and sum(summary["skipped"].values()) == 3
    for name in ("syn_0.png", "sub/group.jpg"):
        assert rows[name]["output"] == f"images/{name}" and Image.open(out / "images" / name).size == (64, 64)
    # Output bytes match the file name: JPEG under .jpg; a GIF (256 colours) is written as <name>.png.
    assert Image.open(out / "images" / "sub" / "group.jpg").format == "JPEG"
    assert rows["anim.gif"]["output"] == "images/anim.gif.png" and not (out / "images" / "anim.gif").exists()
    assert Image.open(out / "images" / "anim.gif.png").format == "PNG"
    # Files and folders follow the umask (022), like a plain mkdir/open.
    for path in (out, out / "images", out / "images" / "sub"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    for path in (out / "manifest.jsonl", out / "images" / "syn_1.png", out / "run.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path

    first = {name: _pixels(out / "images" / name) for name in ("syn_0.png", "syn_1.png", "anim.gif.png")}
    again = _anonymize(mixed_folder, out, "model=base_tiny")
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((out / "summary.json").read_text())
    assert (rerun["done"], rerun["skipped"], rerun["already_done"]) == (0, {}, 8), rerun
    # Another batch size gives the same images up to rounding (see BATCH_TOLERANCE); another seed does not.
    shutil.rmtree(out)
    assert _anonymize(mixed_folder, out, "model=base_tiny", "batch_size=1").returncode == 0
    gaps = [np.abs(_pixels(out / "images" / name) - pixels) for name, pixels in first.items()]
    values = sum(g.size for g in gaps)
    print(f"batch 1 vs 4: max {max(g.max() for g in gaps)}/255, {sum((g > 0).sum() for g in gaps) / values:.4%} differ")
    assert max(g.max() for g in gaps) <= BATCH_TOLERANCE_MAX and np.mean(gaps) <= BATCH_TOLERANCE_MEAN, [
        (g.max(), g.mean()) for g in gaps
    ]
    other = tmp_path / "other_seed"
    assert _anonymize(mixed_folder, other, "model=base_tiny", "seed=1").returncode == 0
    assert np.abs(_pixels(other / "images" / "syn_1.png") - first["syn_1.png"]).mean() > 100 * BATCH_TOLERANCE_MEAN


@pytest.mark.slow
def test_an_output_of_other_settings_is_refused_then_replaced_with_overwrite(
    mixed_folder, tmp_path, trained_checkpoint, tiny_faces_dir
):
    path, _ = trained_checkpoint
    out = tmp_path / "out"
    assert _anonymize(mixed_folder, out, "model=base_tiny").returncode == 0
    base_rows = _manifest(out)
    light = ("model=light_tiny", f"model.checkpoint={path}")
    refused = _anonymize(mixed_folder, out, *light)
    assert_user_error(
        refused,
        f"output: {out} already holds the results of other settings (5 image(s) written, 3 input(s) not)",
        'model._target_: "camouflage_train.pipelines.base.build_base" -> '
        '"camouflage_train.pipelines.light.build_light"',
        "model.checkpoint.sha256: (not set) -> ",
        "pass overwrite=true",
    )
    assert _manifest(out) == base_rows  # untouched

    replaced = _anonymize(mixed_folder, out, *light, "overwrite=true")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    rows = _manifest(out)
    done = [r for r in rows.values() if r["status"] == "done"]
    assert len(done) == 5 and {r["fingerprint"] for r in done} == {
        json.loads((out / "run.json").read_text())["fingerprint"]
    }
    assert {r["fingerprint"] for r in done}.isdisjoint({r.get("fingerprint") for r in base_rows.values()})
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["model"]["checkpoint"]["path"] == str(path)
    assert Image.open(out / "images" / "sub" / "group.jpg").size == (64, 64)


@pytest.mark.slow
def test_bad_rows_of_a_given_sidecar_are_recorded_as_skipped(tmp_path, schema, tiny_model_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    lines = []
    for i in range(2):
        image, persons = draw_scene(i, schema, 64)
        image.save(folder / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "persons": persons}))
    lines += ["{torn", json.dumps({"file": "../../etc/passwd.png", "persons": []}), json.dumps({"persons": []})]
    sidecar = tmp_path / "persons.jsonl"
    sidecar.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    done = _anonymize(folder, out, "model=base_tiny", f"persons={sidecar}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in rows if r["status"] == "done") == ["0.png", "1.png"]
    skipped = {(r["file"], r["reason"]) for r in rows if r["status"] == "skipped"}
    assert skipped == {
        (f"{sidecar}:3", "malformed JSON"),
        ("../../etc/passwd.png", "unsafe file name"),
        (f"{sidecar}:5", "no 'file' field"),
    }


def _rows_so_far(out):
    """The complete rows of the manifest and of its per-process parts: what a killed run had finished."""
    rows = []
    for path in out.glob("manifest*.jsonl"):
        data = path.read_bytes()
        rows += [json.loads(line) for line in data[: data.rfind(b"\n") + 1].decode().splitlines()]
    return rows


@pytest.mark.slow
def test_a_killed_run_resumes_in_two_processes_with_the_one_process_output(mixed_folder, tmp_path, tiny_model_dir):
    """A run killed (SIGKILL) after its first images, rerun on two processes (gloo): what it finished is kept as it
    is and counted as done, the rest is shared out, and the folder ends as one uninterrupted one-process run's."""
    reference = tmp_path / "one"
    assert _anonymize(mixed_folder, reference, "model=base_tiny").returncode == 0
    out = tmp_path / "out"
    killed = start_script("anonymize.py", *_arguments(mixed_folder, out, "model=base_tiny", "batch_size=1"))
    deadline = time.monotonic() + 300
    while not any(row.get("output") for row in _rows_so_far(out)):  # the first image and its row are written
        if not killed.running() or time.monotonic() > deadline:
            killed.kill()
            pytest.fail(f"the run ended before writing an image: {killed.result(60).stderr[-3000:]}")
        time.sleep(0.01)
    killed.kill()
    killed.result(60)
    finished = _rows_so_far(out)
    kept = {row["output"]: ((out / row["output"]).read_bytes(), (out / row["output"]).stat().st_mtime_ns)
            for row in finished if row.get("output")}  # fmt: skip
    assert 1 <= len(kept) < 5, "killed mid-run: some images written, not all"
    # And a person-record row torn as by a kill mid-annotation: the rerun redoes that one image, on one of its two
    # processes (the other gets no input; Lightning's own predict sampler would refuse that).
    sidecar = out / "persons.jsonl"
    *rows_before, last = sidecar.read_text().splitlines(keepends=True)
    sidecar.write_text("".join(rows_before) + last[:10])

    rerun = _anonymize(mixed_folder, out, "model=base_tiny", "batch_size=2", *TWO_PROCESSES)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    printed = [line for line in rerun.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, rerun.stdout[-3000:]  # the summary, printed by rank 0 only
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["already_done"], summary["done"]) == (len(finished), 5 - len(kept)), summary
    annotated = json.loads((out / "persons.summary.json").read_text())
    assert (annotated["images"], annotated["already_done"]) == (1, 7), annotated
    # the torn row was annotated again by a process with other threads: the same records, floats to rounding
    assert_records_close(
        [json.loads(line) for line in sidecar.read_text().splitlines()],
        [json.loads(line) for line in (reference / "persons.jsonl").read_text().splitlines()],
    )
    for name, (data, mtime) in kept.items():  # not redone
        assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == mtime, name
    assert not [path.name for path in out.rglob("*") if ".rank-" in path.name]  # every part merged and removed
    lines = (out / "manifest.jsonl").read_text().splitlines()
    rows = _manifest(out)
    assert len(lines) == len(rows) == 8 and rows == _manifest(reference)  # each input once; same rows, seeds, files
    # Other processes and batches change each process's thread count and batch composition, so float reductions may
    # round differently: the batch tolerance above.
    gaps = [np.abs(_pixels(out / row["output"]) - _pixels(reference / row["output"])) for row in rows.values()
            if row.get("output")]  # fmt: skip
    assert len(gaps) == 5 and max(g.max() for g in gaps) <= BATCH_TOLERANCE_MAX
    assert np.mean(gaps) <= BATCH_TOLERANCE_MEAN


def test_the_retired_device_key_and_a_sharded_strategy_are_refused_with_the_fix(tmp_path):
    """``device`` gave way to the trainer group; FSDP shards training state, which these jobs do not have."""
    out = tmp_path / "out"
    old = run_script("anonymize.py", "device=cuda", f"input.folder={tmp_path}", f"output={out}")
    assert_user_error(old, "'device=cuda': device is replaced by the trainer group", "trainer.accelerator=gpu")
    with initialize_config_dir(config_dir=str(REPO / "configs" / "anonymize"), version_base="1.3"):
        cfg = compose(
            "anonymize.yaml", overrides=["model=base_tiny", "trainer=fsdp", f"input.folder={tmp_path}", f"output={out}"]
        )
    assert cfg.trainer.precision == "32-true"  # whichever trainer file: the pipelines keep their own dtypes
    with pytest.raises(ConfigError, match=r"trainer.strategy: .*FSDPStrategy shards .* use trainer=ddp"):
        run_anonymization(cfg)
    assert not out.exists()
