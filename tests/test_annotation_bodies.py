"""Body boxes in annotation: matching bodies to faces (against its specification, on hand-made boxes), the person
detector in its real transformers format (a tiny random YOLOS saved with ``save_pretrained``), its checks before
anything loads, and ``annotate.py``'s run with faces and bodies."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from camouflage_train.annotation.bodies import BodyDetector, BodyDetectorUnavailableError, match_bodies
from camouflage_train.annotation.run import run_annotation
from camouflage_train.data.schema import BODY_KEY, RECORD_SCHEMA_VERSION, AttributeSchema
from camouflage_train.data.sources import FolderSource
from camouflage_train.errors import user_error_in
from camouflage_train.stand_ins.body_detector import tiny_body_detector
from camouflage_train.utils.config_checks import ConfigError
from tests.conftest import REPO, person

FACE_SCHEMA = yaml.safe_load((REPO / "configs" / "attributes" / "face.yaml").read_text())


@pytest.fixture(scope="session")
def tiny_bodies_dir() -> Path:
    return Path(tiny_body_detector(os.environ["CAMOUFLAGE_CACHE"]))


def _contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


# --- matching, against its specification -------------------------------------------------------------------------


def test_a_face_in_the_upper_part_of_a_body_gets_it_and_a_face_outside_does_not():
    inside, outside = person([0.40, 0.10, 0.50, 0.22]), person([0.80, 0.70, 0.90, 0.80])
    body = [0.30, 0.05, 0.60, 0.95]
    persons, unmatched = match_bodies([inside, outside], [body])
    assert persons[0][BODY_KEY] == body and BODY_KEY not in persons[1]
    assert unmatched == []
    assert BODY_KEY not in inside, "the records given are not changed"
    # A body no face sits in is left over (not a person: identity lives in the faces).
    persons, unmatched = match_bodies([outside], [body])
    assert BODY_KEY not in persons[0] and unmatched == [body]


def test_a_face_in_the_lower_part_or_mostly_outside_a_body_is_not_its_face():
    body = [0.2, 0.1, 0.6, 0.9]
    low = person([0.35, 0.75, 0.45, 0.85])  # a face at the body's feet: another person's, or a hand
    half_out = person([0.55, 0.15, 0.70, 0.30])  # a third of the face inside
    persons, unmatched = match_bodies([low, half_out], [body])
    assert all(BODY_KEY not in p for p in persons) and unmatched == [body]
    # The threshold is the rule: a face 85 % inside is accepted at the default (80 %), refused at 90 %.
    mostly = person([0.515, 0.15, 0.615, 0.25])
    assert BODY_KEY in match_bodies([mostly], [body]).persons[0]
    assert BODY_KEY not in match_bodies([mostly], [body], min_face_inside=0.9).persons[0]


def test_one_body_never_goes_to_two_faces_and_each_face_gets_its_own():
    left, right = person([0.15, 0.10, 0.25, 0.22]), person([0.45, 0.10, 0.55, 0.22])
    wide = [0.10, 0.05, 0.90, 0.95]  # holds both faces, centred on the right one
    persons, unmatched = match_bodies([left, right], [wide])
    assert sum(BODY_KEY in p for p in persons) == 1 and unmatched == []
    assert persons[1][BODY_KEY] == wide, "the face nearer the body's centre gets it"
    # A second body that holds only the right face: taking the best pair first (right face, wide body) would leave
    # the left face without a body; the assignment gives each face one.
    own_right = [0.42, 0.05, 0.70, 0.95]
    persons, unmatched = match_bodies([left, right], [wide, own_right])
    assert persons[0][BODY_KEY] == wide and persons[1][BODY_KEY] == own_right and unmatched == []


def test_the_written_body_contains_its_face_stays_in_the_image_and_passes_the_record_check():
    face = person([0.40, 0.02, 0.52, 0.16])
    detected = [0.36, 0.04, 0.62, 1.08]  # cuts the top of the face, runs past the image's bottom
    (matched,), _ = match_bodies([face], [detected])
    body = matched[BODY_KEY]
    assert _contains(body, face["box"]) and all(0.0 <= v <= 1.0 for v in body)
    assert body == [0.36, 0.02, 0.62, 1.0]
    AttributeSchema.from_config(FACE_SCHEMA).validate(matched, "matched person")


def test_nothing_to_match():
    face = person([0.4, 0.1, 0.5, 0.2])
    assert match_bodies([], [[0.1, 0.1, 0.9, 0.9]]) == ([], [[0.1, 0.1, 0.9, 0.9]])
    assert match_bodies([face], []) == ([face], [])


# --- the detector in its real format ---------------------------------------------------------------------------


def test_the_tiny_detector_loads_and_detects_through_the_real_code(tiny_bodies_dir, group_photo):
    image = Image.open(group_photo).convert("RGB")
    everything = BodyDetector(str(tiny_bodies_dir), score_threshold=0.0, device="cpu")
    boxes = everything(image)
    assert everything.person_labels == [1]
    assert boxes and all(len(b) == 4 and 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1 for b in boxes)
    assert everything(image) == boxes, "detection is deterministic"
    some = BodyDetector(str(tiny_bodies_dir), score_threshold=0.7, device="cpu")(image)
    assert 0 < len(some) < len(boxes) and all(b in boxes for b in some), "the threshold keeps a subset"
    assert BodyDetector(str(tiny_bodies_dir), score_threshold=0.99, device="cpu")(image) == []


def test_a_folder_without_weights_or_a_person_class_is_refused_before_loading(tiny_bodies_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_bodies_dir, partial)
    (partial / "model.safetensors").unlink()
    start = time.monotonic()
    with pytest.raises(
        BodyDetectorUnavailableError, match=r"partial.*model\.safetensors or pytorch_model\.bin.*bodies\.model"
    ):
        BodyDetector(str(partial))
    with pytest.raises(BodyDetectorUnavailableError, match=r"bodies\.model: person detector folder not found"):
        BodyDetector(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"bodies\.score_threshold must be between 0 and 1, got 1\.5"):
        BodyDetector(str(tiny_bodies_dir), score_threshold=1.5)
    assert time.monotonic() - start < 5
    no_person = tmp_path / "no_person"
    shutil.copytree(tiny_bodies_dir, no_person)
    config = json.loads((no_person / "config.json").read_text())
    config["id2label"] = {"0": "N/A", "1": "cat", "2": "bicycle"}
    (no_person / "config.json").write_text(json.dumps(config))
    with pytest.raises(BodyDetectorUnavailableError, match=r"no 'person' class.*'cat'.*COCO-trained.*bodies\.model"):
        BodyDetector(str(no_person)).load()


# --- annotate.py with faces and bodies -------------------------------------------------------------------------


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("annotate.yaml", overrides=list(overrides))


def test_real_data_annotation_detects_bodies_by_default():
    cfg = _compose()
    assert cfg.bodies._target_ == "camouflage_train.annotation.bodies.BodyDetector"
    assert cfg.bodies.model == "hustvl/yolos-tiny"
    assert _compose("bodies=none").bodies is None


def test_annotate_writes_version_2_records_with_bodies_that_training_reads(tiny_faces_dir, group_photo, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    shutil.copy(group_photo, images / "group.jpg")
    Image.new("RGB", (200, 160), (90, 120, 200)).save(images / "empty_room.png")
    out = tmp_path / "persons.jsonl"
    cfg = _compose(
        f"input.folder={images}",
        f"output={out}",
        "faces=tiny",
        "bodies=tiny",
        "bodies.score_threshold=0",
        "num_workers=0",
    )
    summary = run_annotation(cfg)
    rows = {row["file"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert {row["schema_version"] for row in rows.values()} == {RECORD_SCHEMA_VERSION} == {2}
    persons = [p for row in rows.values() for p in row["persons"]]
    with_body = [p for p in persons if BODY_KEY in p]
    assert Path(summary.body_detector).name == "bodies-tiny-v1" and summary.faces == len(persons) > 0
    assert summary.bodies == len(with_body) > 0, "the seeded tiny models give some face a body"
    assert summary.bodies_without_face == sum(row["bodies_without_face"] for row in rows.values()) > 0
    assert rows["empty_room.png"]["persons"] == []
    schema = AttributeSchema.from_config(FACE_SCHEMA)
    for i, record in enumerate(persons):
        schema.validate(record, f"person {i}")
    assert all(_contains(p[BODY_KEY], p["box"]) for p in with_body)
    written = json.loads(out.with_suffix(".summary.json").read_text())
    assert written["bodies"] == summary.bodies and written["bodies_without_face"] == summary.bodies_without_face
    source = FolderSource(images, out, schema=FACE_SCHEMA)
    assert len(source) == 2 and not source.skipped


def test_faces_only_annotation_keeps_working(tiny_faces_dir, group_photo, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    shutil.copy(group_photo, images / "group.jpg")
    out = tmp_path / "persons.jsonl"
    summary = run_annotation(_compose(f"input.folder={images}", f"output={out}", "faces=tiny", "bodies=none"))
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["persons"] and not any(BODY_KEY in p for p in row["persons"]) and "bodies_without_face" not in row
    assert summary.body_detector is None and summary.bodies == summary.bodies_without_face == 0


def test_an_unavailable_detector_stops_annotation_before_any_model_loads(group_photo, tmp_path):
    """Offline with an empty hub cache: the body detector's check fails first, in seconds, with the download
    command and the config key; the face pack (absent here too) is never loaded and nothing is written."""
    images = tmp_path / "img"
    images.mkdir()
    shutil.copy(group_photo, images / "group.jpg")
    out = tmp_path / "persons.jsonl"
    cfg = _compose(
        f"input.folder={images}",
        f"output={out}",
        f"faces.model_root={tmp_path / 'no_insightface'}",
        f"bodies.cache_dir={tmp_path / 'empty_hub_cache'}",
    )
    start = time.monotonic()
    with pytest.raises(Exception) as caught:  # Hydra's instantiate wraps it; the entry point unwraps it
        run_annotation(cfg)
    assert time.monotonic() - start < 10
    error = user_error_in(caught.value)
    assert isinstance(error, BodyDetectorUnavailableError)
    message = str(error)
    assert "hustvl/yolos-tiny" in message and "hf download hustvl/yolos-tiny" in message
    assert "bodies.model=<folder>" in message
    assert not out.exists()
