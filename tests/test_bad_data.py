"""A corpus of bad inputs through every stage: decoding, annotation, sidecar screening, caching, training."""

import json
import math

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from camouflage_train.annotation.faces import FaceAnnotator
from camouflage_train.annotation.run import ImageListing, annotate_dataset
from camouflage_train.callbacks import DataHealthMonitor
from camouflage_train.data.cache import build_cache
from camouflage_train.data.datamodule import PersonDataModule
from camouflage_train.data.images import BadSampleError, load_rgb
from camouflage_train.data.sources import FolderSource
from camouflage_train.models.backbone import load_frozen_backbone
from tests.conftest import cpu_trainer, person

HANDLED = {
    "cmyk.jpg": (40, 30),
    "rgba.png": (40, 30),
    "palette.png": (40, 30),
    "gray16.png": (40, 30),
    "gray.png": (40, 30),
    "exif_rotated.jpg": (30, 40),
    "noface.png": (64, 64),
}
REFUSED = {
    "zero.jpg": "empty file",
    "truncated.jpg": "corrupt image",
    "one.png": "too small",
    "bomb.png": "too many pixels",
}


@pytest.fixture
def corpus(tmp_path, group_photo, monkeypatch):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "zero.jpg").write_bytes(b"")
    Image.open(group_photo).resize((600, 415)).save(root / "group.jpg", quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300_000)  # Pillow's bomb limit, lowered to keep files small
    data = (root / "group.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(root / "cmyk.jpg")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))
    rgba.save(root / "rgba.png")
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.save(root / "palette.png", transparency=0)
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(root / "gray16.png")
    Image.new("L", (40, 30), 90).save(root / "gray.png")
    Image.new("RGB", (1, 1)).save(root / "one.png")
    rotated = Image.new("RGB", (40, 30), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(root / "exif_rotated.jpg", exif=exif)
    Image.new("RGB", (800, 800), "green").save(root / "bomb.png")  # 640k pixels > 2 x the limit
    Image.new("RGB", (64, 64), (128, 128, 128)).save(root / "noface.png")
    return root


def test_every_bad_file_is_handled_or_refused_with_a_reason(corpus):
    for name, size in HANDLED.items():
        image = load_rgb(corpus / name, min_size=8)
        assert image.mode == "RGB" and image.size == size, name
    for name, reason in REFUSED.items():
        with pytest.raises(BadSampleError) as err:
            load_rgb(corpus / name, min_size=8)
        assert err.value.reason == reason, name
    assert np.asarray(load_rgb(corpus / "gray16.png"))[..., 0].max() > 200  # rescaled, not saturated
    rgba = np.asarray(load_rgb(corpus / "rgba.png"))
    assert tuple(rgba[0, 0]) == (255, 255, 255) and tuple(rgba[0, 39]) == (255, 0, 0)  # composited on white
    with pytest.raises(BadSampleError, match="missing file"):
        load_rgb(corpus / "nope.png")


def test_annotation_survives_the_corpus(corpus, tmp_path, tiny_faces_dir):
    annotator = FaceAnnotator(model_name=str(tiny_faces_dir), ctx_id=-1, providers=["CPUExecutionProvider"])
    summary = annotate_dataset(
        ImageListing(folder=corpus, min_image_size=8), annotator, tmp_path / "p.jsonl", max_persons=2, progress=False
    )
    assert summary.images == len(HANDLED) + len(REFUSED) + 1
    assert dict(summary.skipped) == {reason: 1 for reason in REFUSED.values()}
    assert summary.images_without_face >= 1 and summary.faces_dropped_over_max_persons > 0


def _sidecar(corpus, path):
    good = person([0.1, 0.1, 0.6, 0.7])
    rows = [{"file": name, "persons": [good]} for name in [*HANDLED, *REFUSED, "group.jpg"]]
    rows += [
        {"file": "gray.png", "persons": [{**good, "age": math.nan}]},
        {"file": "gray.png", "persons": [{**good, "yaw": 400}]},
        {"file": "gray.png", "persons": [{k: v for k, v in good.items() if k != "gender"}]},
        {"file": "gone.jpg", "persons": [good]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sidecar_screening_caching_and_training_survive_the_corpus(corpus, tmp_path, make_cfg, tiny_model_dir):
    cfg = make_cfg("experiment=demo_tiny")
    schema = dict(cfg.attributes)
    sidecar = _sidecar(corpus, tmp_path / "persons.jsonl")
    source = FolderSource(corpus, sidecar, schema=schema, min_image_size=8, max_skipped_fraction=0.3)
    assert source.skipped == {
        "person record: not a finite number": 1,
        "person record: out of range": 1,
        "person record: missing field": 1,
        "missing file": 1,
    }
    assert len(source) == len(HANDLED) + len(REFUSED) + 1

    dm = PersonDataModule(source, schema, 64, val_source=source, batch_size=4, flip_prob=0.5, random_crop=False)
    dm.setup("fit")
    skipped = {}
    for batch in dm.train_dataloader():
        for reason, count in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    assert sum(skipped.values()) >= 2  # drop_last may leave some out; what is loaded is counted

    backbone = load_frozen_backbone("preset:tiny", with_unet=False)
    folder = build_cache(dm._dataset(source, train=True), backbone, tmp_path / "cache", flip=True, batch_size=4)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["skipped_counts"] == {reason: 1 for reason in REFUSED.values()}

    module = instantiate(cfg.model)
    monitor = DataHealthMonitor()
    trainer = cpu_trainer(
        tmp_path,
        max_steps=4,
        limit_val_batches=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        callbacks=[monitor],
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4 and np.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_a_fully_bad_dataset_stops_with_a_clear_error(corpus, tmp_path, make_cfg, tiny_model_dir):
    cfg = make_cfg("experiment=demo_tiny")
    schema = dict(cfg.attributes)
    bad_rows = tmp_path / "bad_rows.jsonl"
    bad_rows.write_text(json.dumps({"file": "gray.png", "persons": [{"box": [0, 0, 1, 1]}]}) + "\n")
    with pytest.raises(ValueError, match="no usable rows out of 1"):
        FolderSource(corpus, bad_rows, schema=schema)

    unreadable = tmp_path / "unreadable.jsonl"
    rows = [{"file": name, "persons": []} for name in ("zero.jpg", "truncated.jpg", "one.png", "bomb.png")] * 4
    unreadable.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = FolderSource(corpus, unreadable, schema=schema, min_image_size=8)
    dm = PersonDataModule(source, schema, 64, val_source=source, batch_size=4, random_crop=False)
    with pytest.raises(ValueError, match="no usable sample to cache"):
        dm.setup("fit")
        build_cache(dm.train_set, load_frozen_backbone("preset:tiny", with_unet=False), tmp_path / "c", flip=False)
    trainer = cpu_trainer(tmp_path, max_steps=10, callbacks=[DataHealthMonitor(3)])
    with pytest.raises(RuntimeError, match="3 consecutive training batches had no usable sample"):
        trainer.fit(instantiate(cfg.model), datamodule=dm)
