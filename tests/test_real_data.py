"""The real-data path (CelebA-HQ): person-record sidecars are checked before anything loads, evaluation reads only
the validation split, and the README's walkthrough runs verbatim on a CelebA-HQ-layout stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from camouflage_train.errors import InputError
from camouflage_train.evaluation import run_evaluation
from camouflage_train.training import run_training
from tests.celebahq_standin import build_celebahq_standin
from tests.conftest import REPO

# evaluate.py on the tiny stand-in models (faces, recognisers, CLIP, FID features), as eval_tiny sets them.
TINY_EVALUATION = [
    "faces=tiny",
    "recognisers=tiny",
    "metrics.fid.feature={_target_: camouflage_train.stand_ins.features.RandomConvFeatures, num_features: 16}",
    "metrics.clip.model_name=tiny-clip",
    "metrics.clip.pretrained=null",
    "trainer.accelerator=cpu",
]


@pytest.fixture(scope="module")
def celebahq(tmp_path_factory) -> Path:
    return build_celebahq_standin(tmp_path_factory.mktemp("celebahq"))


def test_training_with_a_missing_sidecar_stops_before_the_backbone_download(make_cfg, tmp_path):
    """Offline, reaching the SD 1.5 download would raise BackboneUnavailableError: the sidecars are checked first."""
    cfg = make_cfg("experiment=light_celebahq", f"paths.data_dir={tmp_path}")
    with pytest.raises(InputError) as caught:
        run_training(cfg)
    message = str(caught.value)
    for split in ("train", "validation"):
        assert f"persons_{split}.jsonl' does not exist" in message
        assert f"python annotate.py input.dataset=mattymchen/celeba-hq input.split={split}" in message


def test_evaluation_reads_only_the_validation_split(celebahq, tmp_path):
    (tmp_path / "celebahq").mkdir()
    rows = [
        {
            "index": i,
            "persons": [{"box": [0.3, 0.3, 0.7, 0.7], "age": 30, "gender": "male", "yaw": 0, "pitch": 0, "roll": 0}],
        }
        for i in range(4)
    ]
    (tmp_path / "celebahq" / "persons_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        "experiment=eval_celebahq",
        f"paths.data_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'eval'}",
        f"data.train_source.path={celebahq}",
        f"data.val_source.path={celebahq}",
        "data.resolution=64",
        "data.batch_size=2",
        "data.num_workers=0",
        "metrics.fid.kid_subset_size=2",
        "rows=[identity]",
        *TINY_EVALUATION,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate.yaml", overrides=overrides)
    assert not (tmp_path / "celebahq" / "persons_train.jsonl").exists()
    results = run_evaluation(cfg)
    assert [row["model"] for row in results] == ["identity"]
    assert (tmp_path / "eval" / "results.json").is_file()
