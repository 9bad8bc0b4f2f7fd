import json
import shutil

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from camouflage_train.anonymization import run_anonymization
from camouflage_train.data.synthetic import draw_scene
from tests.conftest import REPO


@pytest.fixture
def mixed_folder(tmp_path, schema, group_photo):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        draw_scene(i, schema, 96)[0].save(folder / f"syn_{i}.png")
    Image.open(group_photo).resize((320, 221)).save(folder / "sub" / "group.jpg")
    (folder / "broken.jpg").write_bytes(b"")
    data = (folder / "sub" / "group.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    return folder


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs" / "anonymize"), version_base="1.3"):
        return compose("anonymize.yaml", overrides=["faces=tiny", "resolution=64", "num_workers=0", *overrides])


@pytest.mark.slow
def test_base_anonymizes_a_mixed_folder_and_resumes(mixed_folder, tmp_path, tiny_model_dir, tiny_faces_dir):
    out = tmp_path / "out"
    summary = run_anonymization(_cfg("model=base_tiny", f"input.folder={mixed_folder}", f"output={out}"))
    rows = {r["file"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert set(rows) == {
        "syn_0.png",
        "syn_1.png",
        "syn_2.png",
        "sub/group.jpg",
        "broken.jpg",
        "truncated.jpg",
        "tiny.png",
    }
    assert rows["broken.jpg"]["reason"] == "annotation: empty file"
    assert rows["truncated.jpg"]["reason"] == "annotation: corrupt image"
    assert rows["tiny.png"]["reason"] == "annotation: too small"
    assert summary["done"] == 4 and sum(summary["skipped"].values()) == 3
    for name in ("syn_0.png", "sub/group.jpg"):
        image = Image.open(out / "images" / name)
        assert image.size == (64, 64) and rows[name]["status"] == "done"
    first = (out / "images" / "syn_1.png").read_bytes()
    again = run_anonymization(_cfg("model=base_tiny", f"input.folder={mixed_folder}", f"output={out}"))
    assert again["done"] == 0 and again["already_done"] == 7
    # A fresh run with another batch size gives the same image: seeds come from file names.
    shutil.rmtree(out)
    run_anonymization(_cfg("model=base_tiny", f"input.folder={mixed_folder}", f"output={out}", "batch_size=1"))
    assert (out / "images" / "syn_1.png").read_bytes() == first


@pytest.mark.slow
def test_light_anonymizes_from_a_training_checkpoint(mixed_folder, tmp_path, trained_checkpoint, tiny_faces_dir):
    path, _ = trained_checkpoint
    out = tmp_path / "light_out"
    summary = run_anonymization(
        _cfg(
            "model=light_tiny",
            f"model.checkpoint={path}",
            f"input.folder={mixed_folder}",
            f"output={out}",
        )
    )
    assert summary["done"] == 4
    assert Image.open(out / "images" / "sub" / "group.jpg").size == (64, 64)
