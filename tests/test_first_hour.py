"""What a new user meets in the first hour: anonymization that fails safe, a demo export whose model card runs as
printed, a checkpoint for another base refused, network errors and typos as one message, stand-ins named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image, ImageFilter

from camouflage_train.anonymization import run_anonymization
from camouflage_train.errors import UserError
from tests.conftest import REPO, assert_user_error, person, run_script


def _anonymize_cfg(folder, sidecar, out, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs" / "anonymize"), version_base="1.3"):
        return compose(
            "anonymize.yaml",
            overrides=[
                "model=base_tiny", "resolution=64", "num_workers=0", "batch_size=8", f"input.folder={folder}",
                f"persons={sidecar}", f"output={out}", *overrides,
            ],
        )  # fmt: skip


def _rows(out):
    return {r["file"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def _detail(image) -> float:
    """How much a 2-pixel Gaussian blur changes the image: the fine detail a face recogniser reads."""
    pixels = np.asarray(image, dtype=np.float32)
    return float(np.abs(pixels - np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)).mean())


@pytest.fixture
def scenes(tmp_path, schema):
    """Five photos and their person records: all persons recorded; none found; five found of which the annotation
    kept two (two more faces over ``max_persons``, one body without a face); one person mostly cut off by the centre
    crop; one wholly outside it, body and all."""
    from camouflage_train.data.synthetic import draw_scene

    folder = tmp_path / "in"
    folder.mkdir()
    rows = []
    for name, seed in (("people.png", 1), ("empty.png", 2), ("crowd.png", 3)):
        image, persons = draw_scene(seed, schema, 64, min_persons=2, max_persons=2)
        image.save(folder / name)
        rows.append({"file": name, "persons": [] if name == "empty.png" else persons})
    rows[2].update(faces_dropped=2, bodies_without_face=1)  # a person seen from behind is left too
    wide = Image.fromarray((np.random.default_rng(0).random((64, 192, 3)) * 255).astype(np.uint8))
    wide.save(folder / "edge.png")  # the centre crop keeps x in [1/3, 2/3]
    rows.append({"file": "edge.png", "persons": [person([0.25, 0.2, 0.4, 0.6])]})  # 47 % of it inside the crop
    wide.save(folder / "outside.png")
    rows.append({"file": "outside.png", "persons": [person([0.0, 0.2, 0.1, 0.6])]})  # wholly cut away, body too
    sidecar = tmp_path / "persons.jsonl"
    sidecar.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder, sidecar


def test_no_image_with_a_person_left_is_written_as_done(scenes, tmp_path, tiny_model_dir, caplog):
    folder, sidecar = scenes
    out = tmp_path / "safe"
    summary = run_anonymization(_anonymize_cfg(folder, sidecar, out))
    rows = _rows(out)
    assert rows["people.png"]["status"] == "done"
    assert (rows["people.png"]["persons_found"], rows["people.png"]["persons_anonymized"]) == (2, 2)
    # The safe default writes nothing for an image where no person was found or persons were left.
    assert rows["empty.png"] == {**rows["empty.png"], "status": "skipped", "reason": "no person found"}
    assert rows["crowd.png"]["reason"] == "persons left" and rows["crowd.png"]["persons_found"] == 5
    assert rows["edge.png"]["reason"] == "persons left" and rows["edge.png"]["persons_anonymized"] == 0
    assert rows["outside.png"]["reason"] == "no person found"  # nobody is left in the written square
    assert sorted(p.name for p in (out / "images").iterdir()) == ["people.png"]
    assert summary["no_person"] == {"policy": "skip", "images": ["empty.png", "outside.png"]}
    assert summary["persons_left"] == {"policy": "skip", "images": {"crowd.png": 3, "edge.png": 1}}
    assert (summary["done"], summary["persons_anonymized"]) == (1, 2)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("with no person found, not written" in m and "empty.png" in m for m in warned), warned
    assert any("persons found but not anonymized" in m and "crowd.png (3)" in m for m in warned), warned
    # Stand-ins are named in the output too.
    assert summary["stand_ins"]["model.backbone.pretrained_model_name_or_path"].startswith("random weights")
    # A rerun resumes: nothing is redone, and the summary still names what the first run flagged.
    again = run_anonymization(_anonymize_cfg(folder, sidecar, out))
    assert again["already_done"] == 5 and again["no_person"]["images"] == ["empty.png", "outside.png"]
    # Other settings (another policy, or another face pack) are refused even where nothing was written: the
    # skipped inputs must be tried again, not counted as done.
    with pytest.raises(UserError, match=r"holds the results of other settings \(1 image\(s\) written, 4 input"):
        run_anonymization(_anonymize_cfg(folder, sidecar, out, "on_no_person=blur"))

    blurred = tmp_path / "blurred"
    summary = run_anonymization(_anonymize_cfg(folder, sidecar, blurred, "on_no_person=blur", "on_persons_left=keep"))
    rows = _rows(blurred)
    assert rows["empty.png"]["status"] == "blurred" and rows["crowd.png"]["status"] == "partly anonymized"
    original, written = Image.open(folder / "empty.png"), Image.open(blurred / "images" / "empty.png")
    assert written.size == original.size and _detail(written) < 0.05 * _detail(original)  # measured 0.03
    assert (summary["blurred"], summary["partly_anonymized"], summary["done"]) == (2, 2, 1)

    copied = tmp_path / "copied"
    run_anonymization(_anonymize_cfg(folder, sidecar, copied, "on_no_person=copy"))
    assert _rows(copied)["empty.png"]["status"] == "copied"
    # Exact on any CPU: a 64-pixel image at resolution 64 is not resized (torchvision returns it as is), and the
    # 8-bit -> [-1, 1] -> 8-bit round trip is elementwise IEEE arithmetic with rounding (no BLAS, no reduction).
    assert np.array_equal(np.asarray(Image.open(copied / "images" / "empty.png")), np.asarray(original))

    with pytest.raises(UserError, match=r"on_no_person: 'maybe' is not a valid choice \(one of skip \| blur \| copy\)"):
        run_anonymization(_anonymize_cfg(folder, sidecar, tmp_path / "x", "on_no_person=maybe"))
    with pytest.raises(UserError, match=r"on_persons_left: None is not a valid choice"):  # null is no policy either
        run_anonymization(_anonymize_cfg(folder, sidecar, tmp_path / "x", "on_persons_left=null"))
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_of_another_base_is_refused_before_anything_is_written(trained_checkpoint, tmp_path):
    checkpoint, _ = trained_checkpoint  # trained on preset:tiny
    out = tmp_path / "out"
    with initialize_config_dir(config_dir=str(REPO / "configs" / "anonymize"), version_base="1.3"):
        cfg = compose(
            "anonymize.yaml",
            overrides=[
                "model=light_mini",
                f"model.checkpoint={checkpoint}",
                f"input.folder={tmp_path}",
                f"output={out}",
            ],
        )
    with pytest.raises(
        UserError, match="trained on the base 'preset:tiny', but this anonymizer config is for 'preset:mini'"
    ):
        run_anonymization(cfg)
    assert not out.exists()


@pytest.mark.slow
def test_the_demo_exports_model_card_runs_as_printed(make_cfg, tmp_path, capsys):
    """The README's path: a demo checkpoint (the mini base, whose text encoder is stored in fp16), the commands the
    run prints at its end, export.py with the demo's anonymizer config, then the card's code exactly as printed."""
    from camouflage_train.training import run_training

    run_training(
        make_cfg(
            "experiment=demo", "trainer.max_steps=1", "data.batch_size=2", "trainer.val_check_interval=1",
            "data.val_source.num_samples=2", "callbacks.sample_grids.num_images=0", "logger=csv",
            "callbacks.model_checkpoint.every_n_train_steps=1",
        )
    )  # fmt: skip
    checkpoint, export = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "export"
    printed = capsys.readouterr().out
    assert f"Training done. Checkpoint: {checkpoint}" in printed
    assert f"python export.py checkpoint={checkpoint} output=exports/demo anonymizer=light_mini" in printed
    assert "faces=mini bodies=none resolution=64 input.folder=examples/mini_scenes" in printed
    refused = run_script("export.py", f"checkpoint={checkpoint}", f"output={export}", "anonymizer=light_tiny")
    assert_user_error(refused, "trained on the frozen base 'preset:mini', not 'preset:tiny'")
    done = run_script("export.py", f"checkpoint={checkpoint}", f"output={export}", "anonymizer=light_mini")
    assert done.returncode == 0, done.stderr[-3000:]
    code = (export / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert "DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type='dpmsolver++')" in code
    assert "num_inference_steps=4," in code and "guidance_scale=3.0," in code  # light_mini's operating point
    namespace: dict = {}
    exec(compile(code, "model card", "exec"), namespace)  # as printed, nothing substituted
    assert np.asarray(namespace["image"]).shape == (64, 64, 3)


def test_an_unreachable_hub_is_one_message_with_the_download_command(tmp_path, monkeypatch):
    """Not offline mode: the hub cannot be reached, and the client raises its transport error."""
    from camouflage_train.models.backbone import load_controlnet
    from camouflage_train.utils.hub import HubError
    from tests.hub_standin import StandinHub

    StandinHub(tmp_path, unreachable=True).install(monkeypatch)
    with pytest.raises(HubError) as caught:
        load_controlnet(
            "lllyasviel/sd-controlnet-canny", cache_dir=str(tmp_path), config_key="model.controlnets.canny.model"
        )
    message = str(caught.value)
    assert message.startswith("Cannot load") and "ConnectError: [Errno 111] Connection refused" in message, message
    assert (
        "hf download lllyasviel/sd-controlnet-canny --include 'config.json' 'diffusion_pytorch_model.safetensors' "
        "--local-dir <folder>`, then pass model.controlnets.canny.model=<folder>"
    ) in message  # only the files the loader reads: no .bin
    assert ".bin" not in message.split("hf download", 1)[1]


def test_override_typos_exit_2_with_the_projects_message_first(tmp_path):
    done = run_script("train.py", "trainer.max_step=10", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.startswith("error: 'trainer.max_step': unknown key for trainer; did you mean 'max_steps'?")
    assert "+trainer.max_step" not in done.stderr.replace("+key=value", "")  # Hydra's advice adds the typo
    # A valid key whose value is still ??? is not called unknown (it was, next to a real typo).
    done = run_script("anonymize.py", "input.folder=x", "output=y", "model.checkpont=x", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2 and "'input.folder'" not in done.stderr, done.stderr
    assert "'model.checkpont': unknown key for model" in done.stderr


def test_warnings_about_skipped_rows_name_the_image(tmp_path, schema, caplog):
    from camouflage_train.data.sources import FolderSource
    from camouflage_train.data.synthetic import draw_scene

    image, persons = draw_scene(0, schema, 64)
    image.save(tmp_path / "kept.png")
    sidecar = tmp_path / "persons.jsonl"
    rows = [{"file": "kept.png", "persons": persons}, {"file": "gone.png", "persons": persons}]
    sidecar.write_text("".join(json.dumps(row) + "\n" for row in rows))
    FolderSource(tmp_path, sidecar, schema=schema.to_config(), max_skipped_fraction=1.0)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("missing file" in m and f"{sidecar}:2 (gone.png)" in m for m in warned), warned


def test_the_sample_scenes_are_what_their_command_writes(tmp_path):
    from camouflage_train.miniworld.scenes import write_example_scenes

    # Drawn here with libm's sin/cos, whose last bit may differ between CPUs (glibc picks FMA code paths at run time):
    # a rotated feature's edge may then cover a pixel more or less. Allowed: a few edge pixels, under 0.1 % of the
    # values (0 measured); an eye or a mouth drawn differently is more.
    for path in write_example_scenes(tmp_path):
        shipped = REPO / "examples" / "mini_scenes" / path.name
        gap = np.asarray(Image.open(shipped)).astype(int) != np.asarray(Image.open(path)).astype(int)
        assert gap.mean() < 0.001, (path.name, gap.mean())
    assert len(list((REPO / "examples" / "mini_scenes").iterdir())) == len(list(tmp_path.iterdir()))


def test_a_dataset_the_hub_cannot_serve_offline_is_one_message_with_the_download_command():
    from camouflage_train.data.sources import HFDatasetSource

    with pytest.raises(UserError) as caught:  # the suite runs with HF_HUB_OFFLINE=1
        HFDatasetSource("someone/not-cached-dataset", split="validation")
    message = str(caught.value)
    assert "dataset 'someone/not-cached-dataset' is not in the datasets cache" in message, message
    assert "hf download someone/not-cached-dataset --repo-type dataset --local-dir <folder>" in message


def test_evaluation_names_light_checkpoint_for_a_checkpoint_of_another_kind(tmp_path):
    import torch

    from camouflage_train.evaluation import run_evaluation

    other = tmp_path / "controlnet.ckpt"  # a Lightning checkpoint without the Light adapter's description
    torch.save({"state_dict": {}, "global_step": 1, "loops": {}, "optimizer_states": []}, other)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate.yaml", overrides=["experiment=eval_tiny", f"light_checkpoint={other}"])
    with pytest.raises(UserError, match=r"light_checkpoint: .*controlnet\.ckpt is a training checkpoint, but not of a"):
        run_evaluation(cfg)


def test_person_records_of_other_settings_are_never_reused(tmp_path, tiny_model_dir):
    """A run killed after annotating, before its first manifest row, leaves only persons.jsonl; a run with another
    face pack or max_persons must not pick those records up as its own."""
    out = tmp_path / "out"

    def cfg(*overrides):
        with initialize_config_dir(config_dir=str(REPO / "configs" / "anonymize"), version_base="1.3"):
            return compose(
                "anonymize.yaml",
                overrides=[
                    "model=base_tiny", "faces=mini", "bodies=none", "resolution=64", "num_workers=0",
                    f"input.folder={REPO / 'examples' / 'mini_scenes'}", f"output={out}", *overrides,
                ],
            )  # fmt: skip

    run_anonymization(cfg())
    (out / "manifest.jsonl").unlink()  # as if killed right after annotating
    with pytest.raises(UserError, match="already holds the results of other settings"):
        run_anonymization(cfg("attributes.max_persons=1"))
    assert run_anonymization(cfg())["done"] == 6  # the same settings resume from the records


def test_a_row_cut_before_its_newline_is_redone_and_the_next_row_starts_a_line(tmp_path):
    from camouflage_train.anonymization import claim_output

    settings = {"model": "m"}
    claim_output(tmp_path, settings, overwrite=False, annotated_here=False)  # writes run.json
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"file": "a.png", "status": "skipped"}\n{"file": "b.png", "status": "skipped"}')  # killed
    rows, _ = claim_output(tmp_path, settings, overwrite=False, annotated_here=False)
    assert [row["file"] for row in rows] == ["a.png"]  # b.png is redone ...
    assert manifest.read_text().endswith("\n") and "b.png" not in manifest.read_text()  # ... on a line of its own
