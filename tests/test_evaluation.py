import json
import math

import numpy as np
import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn
from torchmetrics.image import FrechetInceptionDistance, KernelInceptionDistance

from camouflage_train.annotation.faces import FaceAnnotator
from camouflage_train.data.datamodule import PersonDataModule
from camouflage_train.data.sources import FolderSource
from camouflage_train.evaluation import expand_sweep, run_evaluation
from camouflage_train.metrics.attributes import AttributePreservation, BoxAgreement
from camouflage_train.metrics.clip import ClipConfigError, ClipScorer, WeightsUnavailableError, check_activation
from camouflage_train.metrics.faces import FaceAnalyzer, FaceModelUnavailableError
from camouflage_train.metrics.reid import ReIdentification, match_faces, requested_box_iou
from camouflage_train.metrics.uncertainty import bootstrap_standard_errors, bootstrap_values
from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.modules.evaluation_module import JointEvaluationModule
from camouflage_train.pipelines.anonymizer import Blur, Identity, VaeReconstruction
from camouflage_train.utils.config_checks import ConfigError
from tests.conftest import REPO, cpu_trainer, run_script


def test_reid_maths_on_hand_made_embeddings():
    e = torch.eye(4)
    metric = ReIdentification(threshold=0.5)
    originals = e[:3]
    anonymized = torch.stack([e[0], e[0], 0.6 * e[2] + 0.8 * e[0]])
    metric.update(originals, anonymized, unmatched_original=e[3:])
    out = metric.compute()
    assert out["rank1"] == pytest.approx(1 / 3)  # only the first is nearest to its own original
    assert out["verification"] == pytest.approx(2 / 3)  # own cosines 1, 0, 0.6 against 0.5
    assert out["cosine"] == pytest.approx((1 + 0 + 0.6) / 3)
    assert out["detection_rate"] == pytest.approx(3 / 4) and out["n"] == 3


def test_face_matching_by_box_overlap():
    original = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=float)
    output = np.array([[21, 21, 31, 31], [1, 0, 11, 10], [80, 80, 90, 90]], dtype=float)
    assert sorted(match_faces(original, output)) == [(0, 1), (1, 0)]
    assert match_faces(original, np.zeros((0, 4))) == []


def test_box_agreement_counts_missing_faces_as_zero():
    requested = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=float)
    detected = np.array([[0, 0, 10, 5], [20, 20, 30, 30]], dtype=float)  # half of the first, all of the second
    ious = requested_box_iou(requested, detected)
    np.testing.assert_allclose(ious, [0.5, 1.0, 0.0], atol=1e-6)
    metric = BoxAgreement()
    metric.update(torch.as_tensor(ious))
    metric.update(torch.as_tensor(requested_box_iou(requested[:1], np.zeros((0, 4)))))  # nothing detected
    assert float(metric.compute()) == pytest.approx(1.5 / 4)
    assert math.isnan(float(BoxAgreement().compute()))


def test_attribute_preservation_maths():
    metric = AttributePreservation()
    metric.update(
        torch.tensor([[30.0, 40.0], [50.0, 48.0]]),
        torch.tensor([[1, 1], [0, 1]]),
        torch.tensor([[[10.0, 0, 0], [16.0, 3, 0]], [[0.0, 0, 0], [0.0, 0, 0]]]),
    )
    out = metric.compute()
    assert out["age_mae"] == pytest.approx(6.0) and out["gender_agreement"] == pytest.approx(0.5)
    assert out["pose_mae"] == pytest.approx((9 / 3 + 0) / 2)


class Flatten(nn.Module):
    num_features = 3

    def forward(self, x):
        return x.flatten(1).double()


def _record(row: str, image: str, genders: list[tuple[int, int]]) -> dict:
    """A face record (the format of ``faces.jsonl``) with one face per (original, output) gender pair."""
    faces = [
        {"box": [0, 0, 8, 8], "age": 30.0, "gender": g, "pose": [0, 0, 0],
         "output": {"box": [0, 0, 8, 8], "iou": 1.0, "age": 40.0, "gender": h, "pose": [0, 0, 0], "cosine": {"r": 0.5}}}
        for g, h in genders
    ]  # fmt: skip
    return {"row": row, "image": image, "requested": [{"box": [0, 0, 8, 8], "iou": 0.5}], "faces": faces}


def test_bootstrap_errors_resample_images():
    rng = np.random.default_rng(0)
    agree = rng.random(400) < 0.3  # 400 one-face images, agreement p = 0.3
    records = [_record("a", f"{i:04d}", [(1, 1 if hit else 0)]) for i, hit in enumerate(agree)]
    records += [_record("b", r["image"], [(1, 1)]) for r in records]  # every face agrees
    errors = bootstrap_standard_errors(records, ["r"], resamples=2000)
    p = agree.mean()
    # independent images: the binomial standard error (the bootstrap's own error is ~2 % at 2,000 resamples)
    assert errors["a"]["attr/gender_agreement"] == pytest.approx(np.sqrt(p * (1 - p) / 400), rel=0.1)
    assert errors["b"]["attr/gender_agreement"] == 0.0 and errors["b"]["attr/age_mae"] == 0.0
    assert set(errors["a"]) == {
        "attr/box_iou", "attr/gender_agreement", "attr/age_mae", "attr/pose_mae", "reid/r/detection_rate",
        "reid/r/cosine",
    }  # fmt: skip
    # the faces of one image move together: 20 images of 20 faces each are 20 draws, not 400
    clustered = [_record("c", f"{i:02d}", [(1, int(i < 6))] * 20) for i in range(20)]
    assert bootstrap_standard_errors(clustered, resamples=2000)["c"]["attr/gender_agreement"] == pytest.approx(
        np.sqrt(0.3 * 0.7 / 20), rel=0.15
    )
    # rows are resampled paired: the same images give the same draws, so a row minus itself is exactly 0
    values = bootstrap_values(records + [{**r, "row": "a2"} for r in records if r["row"] == "a"], ["r"])
    assert np.array_equal(values["a"]["attr/gender_agreement"], values["a2"]["attr/gender_agreement"])
    assert math.isnan(bootstrap_standard_errors([_record("d", "x", [(1, 0)])])["d"]["attr/gender_agreement"])


def test_fid_and_kid_on_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, 1, 1, generator=g)
    shift = torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1)
    b = torch.randn(4000, 3, 1, 1, generator=g) + shift
    fid = FrechetInceptionDistance(feature=Flatten())
    fid.update(a, real=True)
    fid.update(b, real=False)
    assert float(fid.compute()) == pytest.approx(5.0, abs=0.25)  # |mu|^2 = 1 + 4, equal covariances
    same = FrechetInceptionDistance(feature=Flatten())
    same.update(a, real=True)
    same.update(a, real=False)
    assert abs(float(same.compute())) < 1e-6
    kid = KernelInceptionDistance(feature=Flatten(), subset_size=500)
    kid.update(a[:2000], real=True)
    kid.update(torch.randn(2000, 3, 1, 1, generator=g), real=False)
    assert abs(float(kid.compute()[0])) < 0.01


def test_blur_baseline_blurs_only_person_regions():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    persons = PersonBatch(
        torch.tensor([[[0.0, 0.0, 0.25, 0.25]]]), torch.zeros(1, 1, 0), torch.zeros(1, 1, 0), torch.tensor([[True]])
    )
    out = Blur(expand=1.0)([image], persons, [0], [""])[0]
    a, b = np.asarray(image).astype(int), np.asarray(out).astype(int)
    assert np.abs(a[:16, :16] - b[:16, :16]).mean() > 10 and np.array_equal(a[20:, 20:], b[20:, 20:])


def test_reconstruction_row_is_the_base_vae_round_trip():
    """The trained mini VAE gives back the scene (what a generated row can keep at most); the random tiny VAE does
    not, so the row tells a decoder that keeps faces from one that does not."""
    from camouflage_train.data.synthetic import draw_scene
    from camouflage_train.miniworld.scenes import face_schema

    images = [draw_scene(seed, face_schema(), 64)[0] for seed in (5, 6)]
    persons = PersonBatch(torch.zeros(2, 1, 4), torch.zeros(2, 1, 0), torch.zeros(2, 1, 0), torch.zeros(2, 1).bool())

    def psnr(backbone: str) -> list[float]:
        out = VaeReconstruction({"pretrained_model_name_or_path": backbone})(images, persons, [0, 1], ["", ""])
        assert [o.size for o in out] == [i.size for i in images]
        errors = [np.mean((np.asarray(o, float) - np.asarray(i, float)) ** 2) for o, i in zip(out, images, strict=True)]
        return [10 * math.log10(255**2 / e) for e in errors]

    trained, random = psnr("preset:mini"), psnr("preset:tiny")
    assert min(trained) > 20 and max(random) < 16, (trained, random)  # measured: 22.7-23.5 dB and 11.1-12.4 dB


def test_clip_with_openai_weights_must_be_the_quickgelu_network(tmp_path):
    """open_clip builds ViT-L-14 with GELU and only warns when given OpenAI's QuickGELU weights: refused, before any
    download, and the evaluation's default names the -quickgelu architecture."""
    with pytest.raises(ClipConfigError, match=r"QuickGELU.*metrics\.clip\.model_name=ViT-L-14-quickgelu"):
        ClipScorer("ViT-L-14", "openai")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        clip = compose(
            "evaluate.yaml", overrides=["experiment=eval_celebahq", f"paths.output_dir={tmp_path}"]
        ).metrics.clip
    check_activation(clip.model_name, clip.pretrained)
    assert open_clip.get_model_config(clip.model_name)["quick_gelu"] is True


def test_missing_weights_name_the_metric(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="CLIP scores"):
        ClipScorer("ViT-B-32-quickgelu", "openai")
    with pytest.raises(FaceModelUnavailableError, match="re-identification"):
        from camouflage_train.metrics.faces import _load_recogniser

        _load_recogniser(str(tmp_path / "missing.onnx"), str(tmp_path), -1, None)
    from camouflage_train.modules.evaluation_module import _fid_metrics

    with pytest.raises(WeightsUnavailableError, match="FID/KID"):
        _fid_metrics(2048, 10)


def test_identity_row_reidentifies_every_real_face(tmp_path, group_photo, tiny_faces_dir):
    photos = group_photo.parent
    rows = []
    for name in ("t1.jpg", "Tom_Hanks_54745.png", "mask_white.jpg", "mask_blue.jpg"):
        Image.open(photos / name).convert("RGB").save(tmp_path / f"{name}.png")
        rows.append({"file": f"{name}.png", "persons": []})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    schema = {"max_persons": 2, "continuous": {}, "categorical": {}}
    source = FolderSource(tmp_path, tmp_path / "p.jsonl", schema=schema)
    dm = PersonDataModule(source, schema, 256, val_source=source, batch_size=2, random_crop=False)
    detector = FaceAnnotator(model_name=str(tiny_faces_dir), providers=["CPUExecutionProvider"], ctx_id=-1)
    faces = FaceAnalyzer(detector, {"tiny": {"model": str(tiny_faces_dir / "w600k_tiny.onnx"), "threshold": 0.3}})
    module = JointEvaluationModule(
        {"identity": Identity()},
        faces,
        ClipScorer("tiny-clip", None),
        fid_feature=_Features(),
        kid_subset_size=2,
        output_dir=str(tmp_path / "out"),
    )
    cpu_trainer(tmp_path).test(module, datamodule=dm)
    (identity,) = module.results
    assert identity["reid/tiny/n"] > 4 and identity["reid/tiny/rank1"] == 1.0
    assert identity["reid/tiny/verification"] == 1.0 and identity["reid/tiny/detection_rate"] == 1.0
    # 4 images, 8 features: the covariance is singular, so the matrix square root is only accurate to ~1e-3.
    assert identity["fid"] == pytest.approx(0.0, abs=1e-2) and identity["clip/clip_i"] == pytest.approx(100.0)
    assert identity["attr/age_mae"] == 0.0 and identity["attr/gender_agreement"] == 1.0
    assert (tmp_path / "out" / "results.md").read_text().startswith("| model |")
    records = [json.loads(line) for line in (tmp_path / "out" / "faces.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in records) == sorted(r["file"] for r in rows)  # one line per row and image
    faces = [face for record in records for face in record["faces"]]
    assert len(faces) == identity["reid/tiny/n"]  # every original face, each matched to itself
    for face in faces:
        assert face["output"]["iou"] == pytest.approx(1.0) and face["output"]["gender"] == face["gender"]
        assert face["output"]["cosine"]["tiny"] == pytest.approx(1.0, abs=1e-5)
    assert identity["attr/gender_agreement_se"] == 0.0 and identity["reid/tiny/detection_rate_se"] == 0.0


class _Features(nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((2, 1))

    def forward(self, x):
        return torch.cat([self.pool(x.float()).flatten(1), x.float().std(dim=(2, 3))[:, :2]], dim=1)[:, :8]


@pytest.mark.slow
def test_eval_demo_end_to_end(tmp_path, trained_checkpoint, tiny_faces_dir):
    path, _ = trained_checkpoint
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "evaluate.yaml",
            overrides=[
                "experiment=eval_tiny",
                f"light_checkpoint={path}",
                f"paths.output_dir={tmp_path / 'eval'}",
                "logger=csv",
            ],
        )
    results = run_evaluation(cfg)
    rows = {r["model"]: r for r in results}
    assert list(rows) == ["identity", "reconstruction", "blur", "base", "light", "no_adapter"]
    identity = rows["identity"]
    assert identity["fid"] == pytest.approx(0.0, abs=1e-2) and identity["reid/tiny_arcface/verification"] == 1.0
    assert all(math.isfinite(r["fid"]) for r in results)
    assert rows["base"]["fid"] > 0 and rows["reconstruction"]["fid"] > 0
    assert all(0.0 <= r["attr/box_iou"] <= 1.0 for r in results)  # synthetic scenes always request boxes
    # Every row under every attacker and protocol; the worst case is the strongest attacker of the row.
    for row in results:
        for protocol in ("same_image", "other_view"):
            attackers = {k.split("/")[1]: v for k, v in row.items() if k.endswith(f"/{protocol}/rank1")}
            assert {"appearance", "context", "context_no_face", "adaptive", "tiny_arcface", "floor", "worst"} <= {
                a.removeprefix("face:") for a in attackers
            }, sorted(attackers)
            # The worst case is no weaker than any attacker (a gallery size of the adaptive one included).
            measured = [
                v for k, v in row.items()
                if k.startswith("attack/") and k.split("/")[2] == protocol and k.split("/")[1] not in ("floor", "worst")
                and (k.endswith("/rank1") or "/rank1@" in k) and not k.endswith("_se") and math.isfinite(v)
            ]  # fmt: skip
            assert attackers["worst"] == max(measured)  # the same stored value, copied: exact
            assert row[f"attack/appearance/{protocol}/n"] == row[f"attack/context/{protocol}/n"] > 8
    # The identity row keeps every pixel: the crop attackers find every person in its own original (rank-1 is a mean
    # of hits; a tolerance, since the output's and the original's features may be read in different batches).
    for attacker in ("appearance", "context"):
        assert identity[f"attack/{attacker}/same_image/rank1"] == pytest.approx(1.0, abs=1e-9)
    # Per person, beside faces.jsonl: each attacker's hit; their mean over a row and protocol is the table's rank-1.
    lines = [json.loads(line) for line in (tmp_path / "eval" / "attacks.jsonl").read_text().splitlines()]
    blur = [line for line in lines if line["row"] == "blur" and line["protocol"] == "other_view"]
    assert len(blur) == rows["blur"]["attack/context/other_view/n"]
    for attacker in ("context", "adaptive"):
        mean = np.mean([line["rank1"][attacker] for line in blur])
        assert mean == pytest.approx(rows["blur"][f"attack/{attacker}/other_view/rank1"], abs=1e-12)
    # Generation time per image, from the second batch on (8 scenes, batch 4): the diffusion rows take longest.
    times = {name: row["time/seconds_per_image"] for name, row in rows.items()}
    assert all(math.isfinite(t) and t >= 0 for t in times.values()), times
    assert min(times["base"], times["light"]) > max(times["identity"], times["blur"]), times
    out = tmp_path / "eval"
    for name in ("results.md", "results.csv", "results.json", "config.yaml", "faces.jsonl", "samples/batch_000.png",
                 "attack_readings.pkl", "attacks.jsonl"):  # fmt: skip
        assert (out / name).is_file(), name
    grid = Image.open(out / "samples" / "batch_000.png")
    assert grid.size[0] > 4 * 64  # original + 4 rows side by side
    # The labelled copy: the same tiles under a strip that names each column (white, with dark text in it).
    labelled = np.asarray(Image.open(out / "samples" / "batch_000_labelled.png").convert("RGB")).astype(int)
    header = labelled.shape[0] - grid.size[1]
    # Exact on any machine: the labelled copy pastes the grid's own pixels (no arithmetic on them).
    assert header > 0 and np.array_equal(labelled[header:], np.asarray(grid.convert("RGB")).astype(int))
    assert (labelled[:header] < 128).any() and (labelled[:header] == 255).mean() > 0.5
    # The stand-ins of eval_tiny (random face packs, CLIP, FID features, models) are named under the table.
    assert "Stand-ins (random test weights, or models of the synthetic mini world)" in (out / "results.md").read_text()
    assert json.loads((out / "stand_ins.json").read_text())["faces.model_name"].startswith("random weights")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        no_ckpt = compose("evaluate.yaml", overrides=["experiment=eval_tiny", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="light_checkpoint"):
        run_evaluation(no_ckpt)


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(tmp_path, tiny_faces_dir, tiny_model_dir):
    """DDP on 2 CPU processes (gloo) gives the one-process numbers; KID draws random subsets, so it is left out."""

    def run(devices: int) -> list[dict]:
        out = tmp_path / f"devices{devices}"
        done = run_script(
            "evaluate.py", "experiment=eval_tiny", "rows=[identity,blur,base]", f"trainer.devices={devices}",
            f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", "logger=csv", f"paths.output_dir={out}",
            cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        faces = [json.loads(line) for line in (out / "faces.jsonl").read_text().splitlines()]
        assert [(r["row"], r["image"]) for r in faces] == sorted(
            ((row, f"{1_000_000 + i:08d}.png") for row in ("identity", "blur", "base") for i in range(8)),
            key=lambda k: (("identity", "blur", "base").index(k[0]), k[1]),
        )  # one file, gathered from both processes, in the same order
        return json.loads((out / "results.json").read_text())

    one, two = run(1), run(2)
    assert [r["model"] for r in two] == ["identity", "blur", "base"] and two[0]["n_images"] == 8
    for a, b in zip(one, two, strict=True):
        for key, value in a.items():
            if key == "model" or key.startswith(("kid", "time/")):  # KID: random subsets; time: the machine's
                continue
            if isinstance(value, str):  # the worst-case attacker's name
                assert b[key] == value, (a["model"], key)
                continue
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-4, nan_ok=True), (a["model"], key)


@pytest.mark.slow
def test_a_sweep_writes_one_row_per_value_and_the_privacy_utility_plot(tmp_path, tiny_faces_dir, tiny_model_dir):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "evaluate.yaml",
            overrides=[
                "experiment=eval_tiny", "rows=[identity,base]", "data.val_source.num_samples=4", "logger=csv",
                "row_sweep={row: base, key: anonymization.scale, name: guidance, values: [0, 0.5, 2]}",
                f"paths.output_dir={tmp_path}",
            ],
        )  # fmt: skip
    results = run_evaluation(cfg)
    assert [r["model"] for r in results] == ["identity", "base@guidance=0", "base@guidance=0.5", "base@guidance=2"]
    identity, *swept = results
    assert identity["struct/edge_iou"] == 1.0 and identity["struct/ssim"] == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= r["struct/edge_iou"] < 1.0 and r["struct/ssim"] < 0.999 for r in swept)
    # the same seeds for every value: guidance changes the images, so the rows differ
    assert len({round(r["struct/ssim"], 6) for r in swept}) == 3
    plot = Image.open(tmp_path / "privacy_utility.png")
    assert plot.size[0] > 600 and len(set(plot.convert("L").getdata())) > 10  # drawn, not blank
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        bad = compose(
            "evaluate.yaml",
            overrides=["experiment=eval_tiny", "rows=[identity,base]", f"paths.output_dir={tmp_path / 'bad'}",
                       "row_sweep={row: base, key: anonymization.scael, values: [0]}"],
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"anonymization\.scael"):
        run_evaluation(bad)


def test_a_kid_subset_larger_than_the_evaluation_split_fails_before_the_first_batch(tmp_path, tiny_faces_dir):
    """torchmetrics' KID raises only in compute, after every row has generated every image."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "evaluate.yaml",
            overrides=["experiment=eval_tiny", "rows=[identity,blur]", "data.val_source.num_samples=3", "logger=csv",
                       f"paths.output_dir={tmp_path}"],
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"kid_subset_size=4 is more than the 3 images"):
        run_evaluation(cfg)
    assert not (tmp_path / "samples").exists()  # no batch ran


def test_several_sweeps_expand_each_row_in_place():
    """A list of sweeps (one per row) gives one curve per swept row; each copy carries its own value."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "evaluate.yaml",
            overrides=[
                "experiment=eval_tiny", "rows=[identity,base,light,no_adapter]", "light_checkpoint=x.ckpt",
                "row_sweep=[{row: base, key: anonymization.scale, name: guidance, values: [0, 0.5]},"
                "{row: light, key: guidance_scale, name: cfg, values: [2, 6]}]",
            ],
        )  # fmt: skip
    expand_sweep(cfg)
    assert list(cfg.rows) == [
        "identity", "base@guidance=0", "base@guidance=0.5", "light@cfg=2", "light@cfg=6", "no_adapter"
    ]  # fmt: skip
    assert [cfg.anonymizers[f"light@cfg={v}"].guidance_scale for v in (2, 6)] == [2, 6]
    assert cfg.anonymizers["light@cfg=6"].checkpoint == "x.ckpt"  # interpolations intact
    assert cfg.anonymizers["no_adapter"].guidance_scale == cfg.anonymizers["light"].guidance_scale  # untouched
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        twice = compose(
            "evaluate.yaml",
            overrides=["experiment=eval_tiny", "rows=[identity,base]",
                       "row_sweep=[{row: base, key: anonymization.scale, values: [0]},"
                       "{row: base, key: anonymization.scale, values: [1]}]"],
        )  # fmt: skip
    with pytest.raises(ConfigError, match="each row can be swept once"):
        expand_sweep(twice)


def test_the_report_table_shows_errors_time_and_missing_values():
    from camouflage_train.metrics.report import results_table

    rows = [
        {"model": "identity", "reid/r/rank1": 1.0, "attr/box_iou": 0.6114, "attr/box_iou_se": 0.0231, "fid": 0.0},
        {"model": "light", "reid/r/rank1": 0.0094, "attr/box_iou": 0.469, "time/seconds_per_image": float("nan")},
    ]
    header, _, identity, light = ([cell.strip() for cell in line.strip("|").split("|")] for line in
                                  results_table(rows, bold=["light"]).splitlines())  # fmt: skip
    assert identity[header.index("box IoU")] == "0.611 ± 0.023"
    assert light[0] == "**light**" and light[header.index("face re-ID rank-1")] == "0.009"
    assert light[header.index("worst-case rank-1, other view")] == "n/a"  # an evaluation without attackers
    assert light[header.index("s / image")] == "n/a" and light[header.index("FID")] == "n/a"
