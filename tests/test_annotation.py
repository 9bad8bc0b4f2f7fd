import json
import shutil
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from camouflage_train.annotation.faces import FaceAnnotator, FaceModelUnavailableError
from camouflage_train.annotation.head_pose import head_pose, project
from camouflage_train.annotation.run import ImageListing, annotate_dataset
from camouflage_train.data.dataset import PersonImageDataset
from camouflage_train.data.schema import RECORD_SCHEMA_VERSION, AttributeSchema
from camouflage_train.data.sources import FolderSource
from camouflage_train.data.synthetic import draw_scene
from tests.conftest import REPO, assert_records_close, run_script

FACE_SCHEMA = yaml.safe_load((REPO / "configs" / "attributes" / "face.yaml").read_text())


@pytest.fixture(scope="module")
def annotator(tiny_faces_dir):
    return FaceAnnotator(
        model_name=str(tiny_faces_dir), det_size=(640, 640), ctx_id=-1, providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("pose", [(0, 0, 0), (35, 0, 0), (0, -25, 0), (0, 0, 20), (-30, 15, -10)])
def test_head_pose_recovers_known_pose_and_mirrors(pose):
    keypoints = project(*pose, center=(400, 300), distance_mm=700, width=800, height=600)
    assert head_pose(keypoints, 800, 600) == pytest.approx(pose, abs=0.5)
    mirrored = keypoints.copy()
    mirrored[:, 0] = 800 - mirrored[:, 0]
    mirrored = mirrored[[1, 0, 2, 4, 3]]  # left/right swap places in the mirror
    yaw, pitch, roll = head_pose(mirrored, 800, 600)
    assert (yaw, pitch, roll) == pytest.approx((-pose[0], pose[1], -pose[2]), abs=0.5)


def test_real_face_analysis_on_group_photo(annotator, group_photo):
    image = Image.open(group_photo).convert("RGB")
    records = annotator(image)
    assert 4 < len(records) < 40
    schema = AttributeSchema.from_config(FACE_SCHEMA)
    for i, record in enumerate(records):
        schema.validate(record, f"t1.jpg person {i}")
        assert 0 <= record["det_score"] <= 1 and len(record["kps"]) == 5
    areas = [(r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1]) for r in records]
    assert areas == sorted(areas, reverse=True)
    assert annotator(Image.new("RGB", (320, 240), (128, 128, 128))) == []


def test_missing_model_pack_fails_fast_with_instructions(tmp_path):
    start = time.monotonic()
    with pytest.raises(FaceModelUnavailableError, match=r"buffalo_l.*faces\.model_name=<folder"):
        FaceAnnotator(model_name="buffalo_l", model_root=str(tmp_path), ctx_id=-1)
    assert time.monotonic() - start < 30


def _corpus(folder, group_photo):
    folder.mkdir()
    shutil.copy(group_photo, folder / "group.jpg")
    Image.new("RGB", (200, 160), (90, 120, 200)).save(folder / "empty_room.png")
    (folder / "zero.jpg").write_bytes(b"")
    data = group_photo.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "tiny.png")


def test_annotation_run_counts_resumes_and_feeds_training(annotator, group_photo, tmp_path):
    _corpus(tmp_path / "img", group_photo)
    listing = ImageListing(folder=tmp_path / "img", min_image_size=32)
    sidecar = tmp_path / "persons.jsonl"
    summary = annotate_dataset(listing, annotator, sidecar, max_persons=4, batch_size=2, progress=False)
    assert summary.images == 5 and summary.already_done == 0
    assert dict(summary.skipped) == {"empty file": 1, "corrupt image": 1, "too small": 1}
    assert summary.images_without_face == 1 and summary.faces == 4 and summary.faces_dropped_over_max_persons > 0
    rows = {r["file"]: r for r in map(json.loads, sidecar.read_text().splitlines())}
    assert rows["group.jpg"]["faces_detected"] == 4 + summary.faces_dropped_over_max_persons
    assert rows["zero.jpg"]["skipped"] == "empty file" and rows["group.jpg"]["schema_version"] == RECORD_SCHEMA_VERSION
    assert json.loads(sidecar.with_suffix(".summary.json").read_text())["images"] == 5

    again = annotate_dataset(listing, annotator, sidecar, max_persons=4, progress=False)
    assert again.images == 0 and again.already_done == 5

    # A killed run: the last row is half written. The rerun cuts it and redoes only that image.
    lines = sidecar.read_text().splitlines(keepends=True)
    sidecar.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    resumed = annotate_dataset(listing, annotator, sidecar, max_persons=4, progress=False)
    assert resumed.images == 1 and len(sidecar.read_text().splitlines()) == 5

    source = FolderSource(tmp_path / "img", sidecar, schema=FACE_SCHEMA)
    assert len(source) == 2 and sum(source.skipped.values()) == 3
    dataset = PersonImageDataset(source, AttributeSchema.from_config(FACE_SCHEMA), 64)
    items = [dataset[i] for i in range(len(dataset))]
    # The centre crop of the landscape photo may cut persons away; they are counted, not lost.
    assert sorted(int(item["person_mask"].sum()) + item["persons_dropped"] for item in items) == [0, 4]


def test_annotation_of_a_hf_dataset(annotator, group_photo, tmp_path):
    import datasets

    images = [Image.open(group_photo).convert("RGB").resize((320, 221)), Image.new("RGB", (64, 64), "white")]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        str(tmp_path / "ds")
    )
    listing = ImageListing(dataset=str(tmp_path / "ds"))
    summary = annotate_dataset(listing, annotator, tmp_path / "p.jsonl", max_persons=4, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and summary.images == 2
    assert rows[1]["persons"] == [] and rows[0]["width"] == 320
    assert np.all([0 <= v <= 1 for r in rows for p in r["persons"] for v in p["box"]])


# The antelopev2 record's detector, attribute and recogniser files (docs/hub_repositories.yaml), as the tiny pack's
# models. Its two landmark files (1k3d68, 2d106det) are left out: there is no tiny stand-in for them, and insightface
# loads every .onnx file of a pack.
ANTELOPE_FILES = {
    "scrfd_10g_bnkps.onnx": "det_tiny.onnx",
    "genderage.onnx": "genderage_tiny.onnx",
    "glintr100.onnx": "w600k_tiny.onnx",
}


@pytest.mark.parametrize("nested", [True, False], ids=["zip-unpacked-in-place", "flat"])
def test_antelopev2_loads_in_both_layouts_its_zip_has_unpacked_into(tmp_path, tiny_faces_dir, group_photo, nested):
    from camouflage_train.metrics.faces import _load_recogniser

    pack = tmp_path / "models" / "antelopev2" / ("antelopev2" if nested else "")
    pack.mkdir(parents=True)
    for name, source in ANTELOPE_FILES.items():
        shutil.copyfile(tiny_faces_dir / source, pack / name)
    annotator = FaceAnnotator("antelopev2", str(tmp_path), ctx_id=-1, providers=["CPUExecutionProvider"])
    assert annotator(Image.open(group_photo).convert("RGB"))
    recogniser = _load_recogniser("antelopev2", str(tmp_path), -1, ["CPUExecutionProvider"])
    assert recogniser.taskname == "recognition"


def test_a_gpu_provider_the_onnxruntime_package_lacks_is_named_with_the_fix(tiny_faces_dir, caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(FaceModelUnavailableError, match=r"CUDAExecutionProvider.*onnxruntime-gpu"):
        FaceAnnotator(str(tiny_faces_dir), ctx_id=-1, providers=["CUDAExecutionProvider"])
    with caplog.at_level("WARNING"):
        FaceAnnotator(str(tiny_faces_dir), ctx_id=-1, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "onnxruntime-gpu" in caplog.text and "using ['CPUExecutionProvider']" in caplog.text


@pytest.mark.slow
def test_two_processes_write_the_one_process_sidecar(tmp_path, schema):
    """annotate.py on two CPU processes (gloo), each annotating its share: the sidecar has the one-process rows, in
    listing order, and no part is left; the summary is printed once."""
    folder = tmp_path / "img"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        draw_scene(i, schema, 96)[0].save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    (folder / "empty.jpg").write_bytes(b"")

    def annotate(name, *overrides):
        done = run_script(
            "annotate.py", f"input.folder={folder}", f"output={tmp_path / name}", "faces=mini", "bodies=none",
            "num_workers=0", "batch_size=1", f"hydra.run.dir={tmp_path / ('run_' + name)}", *overrides,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    annotate("one.jsonl")
    two = annotate("two.jsonl", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    rows = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [row["file"] for row in rows] == ["0.png", "2.png", "empty.jpg", "sub/1.png", "sub/3.png"]
    assert sum(len(row["persons"]) for row in rows) > 0 and rows[2]["skipped"] == "empty file"
    assert_records_close(rows, [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()])
    one_summary, two_summary = (json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("one", "two"))
    timing = ("seconds", "images_per_s")
    assert {k: v for k, v in two_summary.items() if k not in timing} == {
        k: v for k, v in one_summary.items() if k not in timing
    }
    assert not list(tmp_path.glob("*.rank-*")) and sum(line.startswith("{") for line in two.stdout.splitlines()) == 1


def test_each_process_puts_the_face_pack_and_the_body_detector_on_its_own_device():
    import torch
    from omegaconf import OmegaConf

    from camouflage_train.annotation.faces import gpu_provider_options
    from camouflage_train.annotation.run import on_device

    gpu_pack, cpu_pack = OmegaConf.create({"ctx_id": 0}), OmegaConf.create({"ctx_id": -1})
    assert on_device(gpu_pack, torch.device("cuda", 3)) == {"ctx_id": 3}  # rank 3's GPU
    assert on_device(gpu_pack, torch.device("cpu")) == {"ctx_id": -1}  # a CPU trainer runs everything on the CPU
    assert on_device(cpu_pack, torch.device("cuda", 3)) == {}  # a face pack asked to run on the CPU stays there
    assert on_device(OmegaConf.create({"device": "auto"}), torch.device("cuda", 2)) == {"device": "cuda:2"}
    assert on_device(OmegaConf.create({"device": "cpu"}), torch.device("cuda", 2)) == {}
    # insightface leaves onnxruntime's CUDA provider on the first GPU: the device is named in the provider options.
    chosen = gpu_provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"], 3)
    assert chosen["provider_options"] == [{"device_id": 3}, {}]
    assert gpu_provider_options(["CPUExecutionProvider"], 3) == {}
