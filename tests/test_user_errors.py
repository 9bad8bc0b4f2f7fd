"""A new user's mistakes through the real entry points: a short message that names the key or path, a non-zero
exit, no Python traceback (unless asked for), and no work done before the check."""

import json
import os

import lightning as L
import pytest
import torch
from PIL import Image

from camouflage_train.data.synthetic import draw_scene
from tests.conftest import assert_user_error, run_script

pytestmark = pytest.mark.slow  # every test starts the real scripts in fresh processes


@pytest.fixture
def images(tmp_path, schema):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        draw_scene(i, schema, 64)[0].save(folder / f"{i}.png")
    return folder


def test_typos_name_the_key_and_the_closest_valid_one(tmp_path):
    added = run_script("export.py", f"checkpoint={tmp_path}/a.ckpt", f"output={tmp_path}/x", "+overwite=true")
    assert_user_error(added, "+overwite=true", "unknown key for ExportConfig; did you mean 'overwrite'?")
    existing = run_script(
        "train.py", "experiment=demo_tiny", "model.adapter.tokens_per_persn=2", f"hydra.run.dir={tmp_path}"
    )
    assert_user_error(existing, "'model.adapter.tokens_per_persn': unknown key for model.adapter; did you mean")
    assert "'tokens_per_person'? (accepted: category_dim, embed_dim," in existing.stderr


def test_export_of_a_file_that_is_not_a_checkpoint_never_suggests_unsafe_loading(tmp_path):
    picture = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(picture)
    done = run_script("export.py", f"checkpoint={picture}", f"output={tmp_path}/x", f"hydra.run.dir={tmp_path}/run")
    assert_user_error(done, f"checkpoint: '{picture}' is not a training checkpoint")
    assert "weights_only" not in done.stdout + done.stderr
    assert not (tmp_path / "x").exists()


def test_missing_inputs_are_named_with_their_key_before_any_work(tmp_path, images):
    missing = tmp_path / "nowhere" / "last.ckpt"
    evaluation = run_script(
        "evaluate.py", "experiment=eval_tiny", f"light_checkpoint={missing}", f"hydra.run.dir={tmp_path}/eval"
    )
    assert_user_error(evaluation, f"light_checkpoint: '{missing}' does not exist")
    out = tmp_path / "anon"
    anonymize = run_script(
        "anonymize.py",
        "model=light_tiny",
        f"model.checkpoint={missing}",
        "faces=tiny",
        f"input.folder={images}",
        f"output={out}",
        f"hydra.run.dir={tmp_path}/anon_run",
    )
    assert_user_error(anonymize, f"model.checkpoint: '{missing}' does not exist")
    assert not out.exists(), "nothing may be annotated or written before the inputs are checked"
    export = run_script("export.py", f"checkpoint={missing}", f"output={tmp_path}/x", f"hydra.run.dir={tmp_path}/e")
    assert_user_error(export, f"checkpoint: '{missing}' does not exist")


def test_bad_values_are_all_listed_before_annotation_or_model_loading(tmp_path, images):
    out = tmp_path / "anon"
    done = run_script(
        "anonymize.py",
        "model=base_tiny",
        "faces=tiny",
        "resolution=abc",
        "+model.guidance_scal=3",
        f"input.folder={images}",
        f"output={out}",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert_user_error(
        done,
        "command-line override 'resolution=abc': resolution: 'abc' is not a valid int for AnonymizeConfig",
        "model.guidance_scal: unknown key for camouflage_train.pipelines.base.build_base; "
        "did you mean 'guidance_scale'",
    )
    assert not out.exists()
    full = run_script(
        "anonymize.py",
        "model=base_tiny",
        "resolution=abc",
        f"input.folder={images}",
        f"output={out}",
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert full.returncode != 0 and "Traceback" in full.stderr  # the traceback when asked for


def test_an_empty_input_folder_is_an_error_not_a_silent_success(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    annotate = run_script(
        "annotate.py", f"input.folder={empty}", f"output={tmp_path}/p.jsonl", "faces=tiny", f"hydra.run.dir={tmp_path}"
    )
    message = f"no images found in {empty} (extensions .bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)"
    assert_user_error(annotate, message, "not listed: {'not an image file name': 1}")
    anonymize = run_script(
        "anonymize.py", "model=base_tiny", f"input.folder={empty}", f"output={tmp_path}/o", f"hydra.run.dir={tmp_path}"
    )
    assert_user_error(anonymize, message)


def _folder_dataset(root, schema, good: int, bad_lines: list[str] = ()):
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(good):
        image, persons = draw_scene(i, schema, 64)
        image.save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "persons": persons}))
    (root / "persons.jsonl").write_text("\n".join([*lines, *bad_lines]) + "\n")
    return root


FOLDER = ("experiment=demo_tiny", "data=folder", "data.resolution=64", "data.num_workers=0", "logger=csv")


def test_a_dataset_too_small_for_one_batch_fails_with_the_numbers(tmp_path, schema):
    data = _folder_dataset(tmp_path / "data", schema, good=4)
    run = tmp_path / "run"
    done = run_script(
        "train.py",
        *FOLDER,
        f"paths.data_dir={data}",
        "data.val_fraction=0.5",
        "data.batch_size=4",
        f"hydra.run.dir={run}",
    )
    assert_user_error(
        done,
        "no full training batch: 4 usable rows, of which data.val_fraction=0.5 -> 2 for validation and 2 for training",
        "fewer than data.batch_size=4 (drop_last=True",
    )
    assert not list(run.rglob("*.ckpt"))


BAD_LINES = [
    "{oops",
    json.dumps({"persons": []}),
    json.dumps({"file": "../outside.png", "persons": []}),
    json.dumps({"file": "0.png", "persons": [{"box": [0.1, 0.1, 0.2, 0.2], "age": float("nan")}]}),
]


def test_bad_sidecar_rows_are_skipped_and_counted_until_the_limit(tmp_path, schema):
    data = _folder_dataset(tmp_path / "data", schema, good=80, bad_lines=BAD_LINES)  # 4 of 84: 4.8 %
    run = tmp_path / "run"
    done = run_script(
        "train.py", *FOLDER, f"paths.data_dir={data}", "trainer.max_steps=2", "trainer.limit_val_batches=0",
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run / "train.log").read_text()
    for reason in ("malformed JSON", "no 'file' field", "unsafe file name", "person record: missing field"):
        assert f"skipping 1 row(s): {reason} (first: {data / 'persons.jsonl'}:" in log, reason
    assert (run / "checkpoints" / "last.ckpt").is_file()

    too_many = _folder_dataset(tmp_path / "data2", schema, good=20, bad_lines=BAD_LINES)  # 4 of 24: 16.7 %
    done = run_script("train.py", *FOLDER, f"paths.data_dir={too_many}", f"hydra.run.dir={tmp_path / 'run2'}")
    assert_user_error(
        done,
        "4 of 24 rows (16.7%) cannot be used, more than max_skipped_fraction=0.05",
        "malformed JSON: 1 (first: ",
        "unsafe file name: 1",
        "data.train_source.max_skipped_fraction",
    )


def test_symlinks_to_files_and_folders_follow_one_rule_and_skips_are_counted(tmp_path, schema, tiny_faces_dir):
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (elsewhere / "album").mkdir(parents=True)
    root.mkdir()
    draw_scene(0, schema, 64)[0].save(root / "own.png")
    draw_scene(1, schema, 64)[0].save(elsewhere / "single.png")
    draw_scene(2, schema, 64)[0].save(elsewhere / "album" / "linked.png")
    (root / "file_link.png").symlink_to(elsewhere / "single.png")
    (root / "folder_link").symlink_to(elsewhere / "album", target_is_directory=True)
    (root / "broken.png").symlink_to(tmp_path / "gone.png")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "readme.txt").write_text("x")
    out = tmp_path / "persons.jsonl"
    done = run_script(
        "annotate.py", f"input.folder={root}", f"output={out}", "faces=tiny", "bodies=none", f"hydra.run.dir={tmp_path}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = [json.loads(line)["file"] for line in out.read_text().splitlines()]
    assert files == ["file_link.png", "folder_link/linked.png", "own.png"]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["not_listed"] == {
        "broken symlink": 1,
        "folder reached twice through a link": 1,
        "not an image file name": 1,
    }


class OutOfMemoryAtStep(L.Callback):
    """Raises torch's out-of-memory error at the start of training step ``step`` (a GPU's allocator would)."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.55 GiB total)")


def test_out_of_memory_names_the_settings_that_fit(make_cfg, tiny_model_dir):
    from camouflage_train.training import OutOfMemoryAdvice, run_training

    cfg = make_cfg(
        "experiment=demo_tiny",
        "logger=csv",
        "trainer.max_steps=3",
        "data.batch_size=4",
        "+callbacks.oom._target_=tests.test_user_errors.OutOfMemoryAtStep",
    )
    with pytest.raises(OutOfMemoryAdvice) as caught:
        run_training(cfg)
    message = str(caught.value)
    assert "Tried to allocate 2.00 GiB" in message
    assert "data.batch_size=2 trainer.accumulate_grad_batches=2" in message
    assert "model.gradient_checkpointing=high_res" in message and "data.cache.enabled=true" in message
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
