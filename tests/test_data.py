import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF

from camouflage_train.data.datamodule import PersonDataModule
from camouflage_train.data.dataset import CaptionBuilder, PersonImageDataset, Skipped
from camouflage_train.data.sources import FolderSource, HFDatasetSource, SyntheticSource, read_sidecar
from camouflage_train.data.synthetic import (
    SHAPE_RANGES,
    Appearance,
    draw_person,
    draw_scene,
    face_keypoints,
    sample_appearance,
)
from camouflage_train.errors import DataError
from tests.conftest import person


def _folder(tmp_path, images, rows, name="persons.jsonl"):
    (tmp_path / "img").mkdir(exist_ok=True)
    for file, image in images.items():
        image.save(tmp_path / "img" / file)
    sidecar = tmp_path / name
    sidecar.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return FolderSource(tmp_path / "img", sidecar)


def test_synthetic_scenes_are_deterministic_and_valid(schema):
    a, persons_a = draw_scene(7, schema, 64)
    b, persons_b = draw_scene(7, schema, 64)
    assert persons_a == persons_b and list(a.getdata()) == list(b.getdata())
    assert 1 <= len(persons_a) <= schema.max_persons
    for i, p in enumerate(persons_a):
        schema.validate(p, f"scene 7 person {i}")


def test_identity_shape_moves_the_drawn_features_but_not_the_keypoints():
    """Identity lives in the face's shape too. The nominal face's eyes sit on the alignment keypoints; a wider eye
    gap draws them further apart while the keypoints (pose only) stay, so an aligned crop keeps the difference."""
    person = {"box": [0.2, 0.2, 0.6, 0.68], "age": 30.0, "yaw": 0.0, "pitch": 0.0, "roll": 0.0, "gender": "male"}
    colours = ((90, 40, 10), (50, 100, 150), (200, 160, 130))
    keypoints = face_keypoints(person, (64, 64))

    def eye_centres(appearance: Appearance) -> np.ndarray:
        image = Image.new("RGB", (64, 64))
        draw_person(ImageDraw.Draw(image), person, image.size, appearance)
        ys, xs = np.nonzero((np.asarray(image) == 20).all(axis=-1))  # the eyes' colour
        left = xs < keypoints[:2, 0].mean()
        return np.array([[xs[side].mean() + 0.5, ys[side].mean() + 0.5] for side in (left, ~left)])

    nominal = eye_centres(Appearance(*colours))
    np.testing.assert_allclose(nominal, keypoints[:2], atol=0.75)  # pixel centres vs exact points
    wide = eye_centres(Appearance(*colours, eye_gap=1.3))
    nominal_gap = keypoints[1, 0] - keypoints[0, 0]  # 10.2 px: ignoring eye_gap would miss by 3 px
    assert wide[1, 0] - wide[0, 0] == pytest.approx(1.3 * nominal_gap, abs=1.5)
    shapes = [sample_appearance(np.random.default_rng(s), 30.0) for s in range(50)]
    for name, (low, high) in SHAPE_RANGES.items():
        values = [getattr(a, name) for a in shapes]
        assert low <= min(values) < max(values) <= high and max(values) - min(values) > (high - low) / 2


def test_synthetic_face_size_sets_the_box_widths_and_the_cache_key(schema):
    default = SyntheticSource(schema, 8, 64, seed=5)
    small = SyntheticSource(schema, 8, 64, seed=5, face_size=[0.15, 0.35])
    widths = [p["box"][2] - p["box"][0] for i in range(8) for p in small[i].persons]
    assert all(0.15 - 1e-3 <= w <= 0.35 + 1e-3 for w in widths)
    assert [p["box"] for p in default[0].persons] == [p["box"] for p in draw_scene(5, schema, 64)[1]]
    assert default.fingerprint()["face_size"] == [0.3, 0.5] and small.fingerprint()["face_size"] == [0.15, 0.35]
    with pytest.raises(ValueError, match="face_size"):
        SyntheticSource(schema, 8, 64, face_size=[0.5, 0.3])


def test_flip_mirrors_pixels_boxes_and_yaw(tmp_path, schema):
    image, persons = draw_scene(3, schema, 64)
    source = _folder(tmp_path, {"a.png": image}, [{"file": "a.png", "persons": persons}])
    plain = PersonImageDataset(source, schema, 64, flip_prob=0.0)[0]
    flipped = PersonImageDataset(source, schema, 64, flip_prob=1.0)[0]
    assert torch.equal(flipped["pixel_values"], TF.horizontal_flip(plain["pixel_values"]))
    n = int(plain["person_mask"].sum())
    b, fb = plain["boxes"][:n], flipped["boxes"][:n]
    torch.testing.assert_close(fb[:, 0], 1 - b[:, 2])
    torch.testing.assert_close(fb[:, 2], 1 - b[:, 0])
    torch.testing.assert_close(fb[:, 1::2], b[:, 1::2])
    yaw = schema.names.index("yaw")
    torch.testing.assert_close(flipped["continuous"][:n, yaw], 1 - plain["continuous"][:n, yaw])


def test_resize_crop_moves_boxes_and_counts_cut_persons(tmp_path, schema):
    # 128x64 image -> resize to 128x64 (shorter side 64) -> centre crop 64x64 keeps x in [32, 96).
    image = Image.new("RGB", (128, 64))
    inside = person([0.375, 0.25, 0.5, 0.75])  # x 48..64 px -> 16..32 in the crop
    outside = person([0.0, 0.1, 0.125, 0.4])  # x 0..16 px: fully cut away
    source = _folder(tmp_path, {"w.png": image}, [{"file": "w.png", "persons": [inside, outside]}])
    item = PersonImageDataset(source, schema, 64)[0]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["person_mask"].tolist() == [True, False, False] and item["persons_dropped"] == 1
    torch.testing.assert_close(item["boxes"][0], torch.tensor([0.25, 0.25, 0.5, 0.75]))


def test_more_persons_than_max_keeps_largest(tmp_path, schema):
    persons = [person([0.1 * i, 0.1, 0.1 * i + 0.05 + 0.01 * i, 0.3]) for i in range(5)]
    source = _folder(tmp_path, {"m.png": Image.new("RGB", (64, 64))}, [{"file": "m.png", "persons": persons}])
    item = PersonImageDataset(source, schema, 64)[0]
    assert item["persons_dropped"] == 2 and int(item["person_mask"].sum()) == 3
    assert item["boxes"][0, 0] == pytest.approx(0.2)


def test_invalid_record_is_skipped_counted_and_named(tmp_path, schema, caplog):
    bad = {**person([0.1, 0.1, 0.3, 0.3]), "age": -4}
    rows = [{"file": "a.png", "persons": [person([0.1, 0.1, 0.3, 0.3])]}, {"file": "a.png", "persons": [bad]}]
    source = _folder(tmp_path, {"a.png": Image.new("RGB", (32, 32))}, rows)
    dataset = PersonImageDataset(source, schema, 32)
    assert isinstance(dataset[0], dict)
    assert dataset[1] == Skipped("person record: out of range", "a.png")
    assert "persons.jsonl:2 (a.png), person 0: 'age' = -4" in caplog.text
    screened = FolderSource(
        tmp_path / "img", tmp_path / "persons.jsonl", schema=schema.to_config(), max_skipped_fraction=0.5
    )
    assert len(screened) == 1 and screened.skipped == {"person record: out of range": 1}
    with pytest.raises(DataError, match="no usable rows out of 1"):
        _folder(tmp_path, {}, [rows[1]], name="bad.jsonl")
        FolderSource(tmp_path / "img", tmp_path / "bad.jsonl", schema=schema.to_config())


def _screening_sidecar(tmp_path, good_rows):
    """``good_rows`` valid rows, then one bad row of each kind the screening knows."""
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    good = person([0.1, 0.1, 0.3, 0.3])
    lines = [json.dumps({"file": "a.png", "persons": [good]})] * good_rows
    lines += [
        "{oops",  # malformed JSON
        "[1, 2]",  # not an object
        json.dumps({"persons": [good]}),  # no file
        json.dumps({"file": "../escape.png", "persons": [good]}),  # leaves the folder
        json.dumps({"file": "/etc/passwd", "persons": [good]}),  # absolute
        json.dumps({"file": "a.png", "persons": {}}),  # persons not a list
        json.dumps({"file": "gone.png", "persons": [good]}),
        json.dumps({"file": "a.png", "persons": [{**good, "age": float("nan")}]}),
        json.dumps({"file": "a.png", "persons": [{**good, "yaw": 400}]}),
        json.dumps({"file": "a.png", "persons": [{k: v for k, v in good.items() if k != "gender"}]}),
        json.dumps({"file": "a.png", "persons": [{**good, "gender": "robot"}]}),
        json.dumps({"file": "a.png", "persons": [{**good, "box": [0.5, 0.5, 0.2, 0.2]}]}),
    ]
    sidecar = tmp_path / "persons.jsonl"
    sidecar.write_text("\n".join(lines) + "\n")
    return sidecar


EXPECTED_SKIPS = {
    "malformed JSON": 1,
    "not a JSON object": 1,
    "no 'file' field": 1,
    "unsafe file name": 2,
    "no 'persons' list": 1,
    "missing file": 1,
    "person record: not a finite number": 1,
    "person record: out of range": 1,
    "person record: missing field": 1,
    "person record: unknown class": 1,
    "person record: bad box": 1,
}


def test_sidecar_rows_are_screened_up_front_and_counted_per_reason(tmp_path, schema, caplog):
    sidecar = _screening_sidecar(tmp_path, good_rows=300)  # 12 bad of 312: under the default 5 % limit
    source = FolderSource(tmp_path / "img", sidecar, schema=schema.to_config())
    assert len(source) == 300 and dict(source.skipped) == EXPECTED_SKIPS
    for reason in EXPECTED_SKIPS:  # one warning per reason, with its first example
        assert f"{reason} (first: " in caplog.text
    assert "persons.jsonl:301" in caplog.text and "'yaw' = 400" in caplog.text


def test_too_many_bad_rows_stop_with_every_reason_listed(tmp_path, schema):
    sidecar = _screening_sidecar(tmp_path, good_rows=100)  # 12 of 112 = 10.7 %
    with pytest.raises(DataError, match=r"12 of 112 rows \(10.7%\) cannot be used") as error:
        FolderSource(tmp_path / "img", sidecar, schema=schema.to_config())
    assert all(reason in str(error.value) for reason in EXPECTED_SKIPS)
    assert "max_skipped_fraction" in str(error.value)
    relaxed = FolderSource(tmp_path / "img", sidecar, schema=schema.to_config(), max_skipped_fraction=0.2)
    assert len(relaxed) == 100


def test_read_sidecar_returns_rejected_lines_with_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"file": "a.png", "persons": []}\n{oops\n{"file": "b.png", "persons": {}}\n'
        '{"file": "c.png", "persons": [], "schema_version": 2}\n{"file": "d.png", "persons": [], "schema_version": 3}\n'
        '{"file": "e.png", "persons": [], "schema_version": 2.0}\n'  # a float column's 2
    )
    rows, rejected = read_sidecar(path)
    assert [r["file"] for r in rows] == ["a.png", "c.png", "e.png"]  # versions 1 (no field) and 2 read
    assert [(r.where, r.reason) for r in rejected] == [
        (f"{path}:2", "malformed JSON"),
        (f"{path}:3", "no 'persons' list"),
        (f"{path}:5", "newer record version"),
    ]
    assert "upgrade camouflage-train" in rejected[2].detail


def test_parquet_sidecar_with_captions(tmp_path, schema):
    import pyarrow as pa
    import pyarrow.parquet as pq

    Image.new("RGB", (48, 48), "red").save(tmp_path / "r.png")
    table = pa.Table.from_pylist(
        [{"file": "r.png", "persons": [person([0.2, 0.2, 0.6, 0.6])], "caption": "a red room"}]
    )
    pq.write_table(table, tmp_path / "p.parquet")
    item = PersonImageDataset(FolderSource(tmp_path, tmp_path / "p.parquet"), schema, 32)[0]
    assert item["caption"] == "a red room" and bool(item["person_mask"][0])


def test_hf_dataset_source_column_and_sidecar(tmp_path, schema):
    images = [draw_scene(i, schema, 48) for i in range(3)]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "persons": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict(
        {"image": [im for im, _ in images], "text": ["t0", "t1", "t2"], "persons": ["", "", ""]}, features=features
    )
    ds = ds.remove_columns("persons").add_column("persons", [p for _, p in images])
    ds.save_to_disk(str(tmp_path / "ds"))
    source = HFDatasetSource(str(tmp_path / "ds"), caption_column="text")
    sample = source[1]
    assert len(source) == 3 and sample.caption == "t1" and sample.persons == images[1][1]
    assert sample.image.size == (48, 48)

    sidecar = tmp_path / "side.jsonl"
    sidecar.write_text(json.dumps({"index": 2, "persons": images[2][1]}) + "\n")
    keyed = HFDatasetSource(str(tmp_path / "ds"), persons_column=None, sidecar=sidecar)
    assert len(keyed) == 1 and keyed[0].persons == images[2][1] and "row 2" in keyed[0].key
    with pytest.raises(ValueError, match="missing column"):
        HFDatasetSource(str(tmp_path / "ds"), image_column="pixels")


def test_caption_template():
    build = CaptionBuilder(template="a photo of {people}", person="a {age:.0f} year old {gender}")
    assert build(None, [person([0, 0, 1, 1], age=33.4, gender="male")]) == "a photo of a 33 year old male"
    assert build("given", []) == "given"
    assert build(None, []) == "a photo of nobody"


def test_datamodule_split_and_batches(schema):
    dm = PersonDataModule(
        SyntheticSource(schema.to_config(), 20, 32), schema.to_config(), 32, val_fraction=0.2, batch_size=4
    )
    dm.setup("fit")
    assert len(dm.train_set) == 16 and len(dm.val_set) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["boxes"].shape == (4, 3, 4) and batch["person_mask"].dtype == torch.bool
    assert len(batch["caption"]) == 4 and batch["persons_dropped"].shape == (4,)


def test_the_recorded_body_bounds_everything_drawn_for_the_person(schema):
    """The generator's body box is the person's drawn extent: every pixel drawn for it lies inside, and the drawing
    reaches each side of the box (to a pixel)."""
    from camouflage_train.data.synthetic import sample_person

    rng = np.random.default_rng(5)
    for _ in range(20):
        record = sample_person(rng, schema, [])
        canvas = Image.new("RGB", (64, 64), (0, 0, 0))
        draw_person(ImageDraw.Draw(canvas), record, (64, 64), sample_appearance(rng, float(record["age"])))
        ys, xs = np.nonzero(np.asarray(canvas).any(axis=-1))
        x0, y0, x1, y1 = (v * 64 for v in record["body"])
        assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
        assert xs.min() <= x0 + 1 and xs.max() >= x1 - 2 and ys.min() <= y0 + 1 and ys.max() >= y1 - 2
        schema.validate(record, "drawn")


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_crops_and_flips_move_the_body_with_its_pixels(tmp_path, schema, flip_prob):
    """A body painted into a wide image: after the resize, centre crop and (mirroring) flip, the batch's extent
    bounds the painted pixels to a pixel; a person without a body box gets its face grown by the schema."""
    image = Image.new("RGB", (128, 64))
    draw = ImageDraw.Draw(image)
    body, face = [0.3, 0.1, 0.55, 0.9], [0.375, 0.15, 0.47, 0.35]  # x 38..70 px, in the crop 6..38
    draw.rectangle([body[0] * 128, body[1] * 64, body[2] * 128 - 1, body[3] * 64 - 1], fill=(0, 255, 0))
    records = [{**person(face), "body": body}, person([0.6, 0.2, 0.66, 0.3])]
    source = _folder(tmp_path, {"w.png": image}, [{"file": "w.png", "persons": records}])
    item = PersonImageDataset(source, schema, 64, flip_prob=flip_prob)[0]
    pixels = item["pixel_values"].numpy()
    ys, xs = np.nonzero(pixels[1] > 0.5)  # the painted green
    x0, y0, x1, y1 = (item["extents"][0] * 64).tolist()
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1 and abs(ys.min() - y0) <= 1
    assert abs(ys.max() + 1 - y1) <= 1
    fx0, fy0, fx1, fy1 = item["boxes"][0].tolist()
    assert x0 / 64 <= fx0 and fx1 <= x1 / 64 and y0 / 64 <= fy0 and fy1 <= y1 / 64
    fx0, fy0, fx1, fy1 = item["boxes"][1].tolist()
    left, top, right, bottom = schema.body.from_face
    w, h = fx1 - fx0, fy1 - fy0
    grown = [fx0 - left * w, fy0 - top * h, fx1 + right * w, fy1 + bottom * h]
    torch.testing.assert_close(item["extents"][1], torch.tensor(grown).clamp(0, 1), atol=1e-5, rtol=0)
