import json

import datasets
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from camouflage_train.data.datamodule import PersonDataModule
from camouflage_train.data.dataset import CaptionBuilder, PersonImageDataset, Skipped
from camouflage_train.data.sources import FolderSource, HFDatasetSource, SyntheticSource, read_sidecar
from camouflage_train.data.synthetic import draw_scene
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
    assert dataset[1] == Skipped("invalid person record", "a.png")
    assert "persons.jsonl:2 (a.png), person 0: 'age' = -4" in caplog.text
    screened = FolderSource(tmp_path / "img", tmp_path / "persons.jsonl", schema=schema.to_config())
    assert len(screened) == 1 and screened.skipped == {"invalid person record": 1}
    with pytest.raises(ValueError, match="no usable rows out of 1"):
        _folder(tmp_path, {}, [rows[1]], name="bad.jsonl")
        FolderSource(tmp_path / "img", tmp_path / "bad.jsonl", schema=schema.to_config())


def test_malformed_sidecar_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"file": "a.png", "persons": []}\n{oops\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        read_sidecar(path)
    path.write_text('{"file": "a.png", "persons": {}}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'persons'"):
        read_sidecar(path)


def test_folder_source_refuses_paths_outside_root(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "p.jsonl").write_text('{"file": "../secret.png", "persons": []}\n')
    with pytest.raises(ValueError, match="must stay inside"):
        FolderSource(tmp_path / "img", tmp_path / "p.jsonl")


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
