"""The real-data path (CelebA-HQ): person-record sidecars are checked before anything loads, evaluation reads only
the validation split, and the README's walkthrough runs verbatim on a CelebA-HQ-layout stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from camouflage_train.errors import DataError, InputError
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
    "attackers/context=tiny",
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
        "logger=csv",  # W&B keeps process-wide settings: a W&B run here would move a later test's run folder
        *TINY_EVALUATION,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate.yaml", overrides=overrides)
    # Who is who is read before any image or model loads: a missing identity sidecar is named with its fix.
    with pytest.raises(DataError, match=r"identities.jsonl does not exist.*identities celebahq"):
        run_evaluation(cfg)
    assert not (tmp_path / "eval" / "results.json").exists()
    overrides.append("other_views=null")  # the same-image protocol only: this test is about the splits
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate.yaml", overrides=overrides)
    assert not (tmp_path / "celebahq" / "persons_train.jsonl").exists()
    results = run_evaluation(cfg)
    assert [row["model"] for row in results] == ["identity"]
    assert (tmp_path / "eval" / "results.json").is_file()


WALKTHROUGH = REPO / "scripts" / "walkthrough_celebahq.sh"


def _block(text: str) -> list[str]:
    lines = text.splitlines()
    start, end = lines.index("# walkthrough:start"), lines.index("# walkthrough:end")
    return lines[start + 1 : end]


def test_the_readme_shows_the_walkthrough_script_verbatim():
    readme = (REPO / "README.md").read_text()
    assert "# walkthrough:start" in readme, "the README's real-data walkthrough block is missing"
    assert _block(readme) == _block(WALKTHROUGH.read_text())


# The tiny models and CPU settings each step adds to the walkthrough's commands (its *_ARGS hooks).
STANDIN_ARGS = {
    "ANNOTATE_ARGS": "faces=tiny bodies=tiny num_workers=0",
    "TRAIN_ARGS": "model=light_tiny trainer=cpu logger=csv data.resolution=64 data.batch_size=2 data.val_batch_size=2 "
    "data.num_workers=0 data.persistent_workers=false data.pin_memory=false data.cache.enabled=false "
    "trainer.max_steps=2 trainer.val_check_interval=2 trainer.precision=32 model.backbone.weight_dtype=fp32",
    "EVAL_ARGS": "anonymize/model@anonymizers.base=base_tiny anonymize/model@anonymizers.light=light_tiny logger=csv "
    "data.resolution=64 data.batch_size=2 data.num_workers=0 metrics.fid.kid_subset_size=2 "
    + " ".join(TINY_EVALUATION).replace(", ", ",").replace(": ", ":"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.slow
def test_the_walkthrough_runs_end_to_end_on_the_celebahq_layout(celebahq, tmp_path):
    """Annotate both splits -> train -> evaluate -> export, the README's commands, on the stand-in dataset."""
    env = {
        **os.environ,
        "DATA": str(celebahq),
        "SD": "preset:tiny",
        "DATA_DIR": str(tmp_path / "data"),
        "RUN": str(tmp_path / "run"),
        "EXPORT": str(tmp_path / "export"),
        # CelebA's files in their published layout: validation rows 0-1 and 2-3 are one identity each.
        "CELEBA_IDS": str(
            _write(tmp_path / "identity_CelebA.txt", "".join(f"{i:06d}.jpg {i // 2}\n" for i in range(4)))
        ),
        "HQ_MAPPING": str(
            _write(
                tmp_path / "CelebA-HQ-to-CelebA-mapping.txt",
                "idx orig_idx orig_file\n" + "".join(f"{i} {i} {i:06d}.jpg\n" for i in range(4)),
            )
        ),
        "VAL_FIRST": "0",
        **STANDIN_ARGS,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(["bash", str(WALKTHROUGH)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for split in ("train", "validation"):
        assert (tmp_path / "data" / "celebahq" / f"persons_{split}.jsonl").stat().st_size > 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert [row["model"] for row in results] == ["identity", "reconstruction", "blur", "base", "light"]
    # Both protocols and every attacker ran on the real-data path (the tiny stand-ins measure nothing).
    for row in results:
        for protocol in ("same_image", "other_view"):
            assert {f"attack/{a}/{protocol}/rank1" for a in ("context", "appearance", "worst")} <= set(row)
        assert row["attack/context/other_view/n"] == 4.0
    assert (tmp_path / "export" / "ip-adapter_camouflage.safetensors").is_file()
