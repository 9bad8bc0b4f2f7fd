"""The project's loaders against stand-ins with the real hub repositories' file layouts (docs/hub_repositories.yaml).

Each stand-in has exactly the recorded file names, tiny weights in each file's real format, and is served by a hub
client that hands out only the files a request's patterns match (tests/hub_standin.py): a loader that asks for a
file the real repository does not have fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from camouflage_train.models.backbone import BackboneUnavailableError, load_controlnet, load_frozen_backbone
from camouflage_train.models.presets import materialize_preset
from camouflage_train.utils.hub import HubLayoutError
from tests.conftest import REPO
from tests.hub_standin import StandinHub, build_standin, record, records

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TILE = "lllyasviel/control_v11f1e_sd15_tile"
CONTROLNETS = [r["repo"] for r in records() if r.get("loader", "").endswith("load_controlnet")]
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def _sd_standin(root: Path) -> Path:
    tiny = materialize_preset("tiny")
    folder = build_standin(
        record(SD15)["files"],
        tiny,
        root / "sd15",
        {sub: tiny / sub for sub in ("unet", "vae", "text_encoder")},
    )
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS))
    return folder


def _controlnet_standin(repo: str, root: Path) -> Path:
    tiny = materialize_preset("tiny-controlnet-0")
    return build_standin(record(repo)["files"], tiny, root / repo.replace("/", "--"), {"": tiny})


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandinHub:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    standin = StandinHub(tmp_path / "hub")
    standin.add(SD15, _sd_standin(tmp_path / "repos"))
    for repo in CONTROLNETS:
        standin.add(repo, _controlnet_standin(repo, tmp_path / "repos"))
    return standin.install(monkeypatch)


def test_every_repository_the_configs_name_has_a_record() -> None:
    recorded = {r["repo"] for r in records()}
    named: set[str] = set()
    for path in (REPO / "configs").rglob("*.yaml"):
        for value in re.findall(
            r"(?:model|path|pretrained_model_name_or_path|dataset):\s*([\w.-]+/[\w.-]+)", path.read_text()
        ):
            if not value.startswith(("camouflage_train", "configs")):
                named.add(value)
    assert named, "the scan found no repository ids"
    assert named <= recorded, (
        f"repositories named in configs/ without a record in docs/hub_repositories.yaml: {named - recorded}"
    )


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sd15_loads_from_its_real_layout_fetching_one_weights_file_per_component(hub: StandinHub, variant) -> None:
    backbone = load_frozen_backbone(SD15, variant=variant, weight_dtype="fp32")
    assert len(backbone.tokenizer) == 49408
    suffix = ".fp16" if variant else ""
    weights = {name for name in hub.served[SD15] if name.endswith((".safetensors", ".bin"))}
    assert weights == {
        f"unet/diffusion_pytorch_model{suffix}.safetensors",
        f"vae/diffusion_pytorch_model{suffix}.safetensors",
        f"text_encoder/model{suffix}.safetensors",
    }
    assert not any(name.endswith(".ckpt") or name.startswith("safety_checker/") for name in hub.served[SD15])


@pytest.mark.parametrize("repo", CONTROLNETS)
def test_every_controlnet_of_base_loads_from_its_real_layout(hub: StandinHub, repo: str) -> None:
    controlnet = load_controlnet(repo, "fp32")
    assert not any(p.requires_grad for p in controlnet.parameters())
    files = set(record(repo)["files"])
    expected = (
        "diffusion_pytorch_model.safetensors"
        if "diffusion_pytorch_model.safetensors" in files
        else "diffusion_pytorch_model.bin"
    )
    assert hub.served[repo] == {"config.json", expected}


def test_the_tile_controlnet_without_safetensors_is_read_from_its_bin_file(hub: StandinHub) -> None:
    assert "diffusion_pytorch_model.safetensors" not in record(TILE)["files"]
    load_controlnet(TILE, "fp32")
    assert hub.served[TILE] == {"config.json", "diffusion_pytorch_model.bin"}


def test_a_variant_the_repository_lacks_is_one_clear_error_before_any_download(hub: StandinHub) -> None:
    with pytest.raises(
        HubLayoutError,
        match=r"control_v11f1e_sd15_tile.*diffusion_pytorch_model\.fp16\.safetensors or "
        r"diffusion_pytorch_model\.fp16\.bin.*model\.anonymization\.model",
    ):
        load_controlnet(TILE, "fp16", variant="fp16", config_key="model.anonymization.model")
    assert TILE not in hub.served


def test_base_from_its_config_builds_and_anonymizes_with_the_real_repository_ids(
    hub: StandinHub, tmp_path: Path
) -> None:
    """configs/anonymize/model/base.yaml, unchanged but for the annotators (controlnet_aux is an extra) and fp32
    on CPU: SD 1.5, five ControlNets and the tile ControlNet load from their real layouts and anonymize a scene."""
    from camouflage_train.models.conditioning import PersonBatch

    with initialize_config_dir(config_dir=str(REPO / "configs" / "anonymize" / "model"), version_base="1.3"):
        cfg = compose("base.yaml", overrides=[f"+paths.cache_dir={tmp_path / 'cache'}"])
    model = OmegaConf.to_container(cfg, resolve=True)
    model.pop("paths")
    for spec in model["controlnets"].values():
        assert spec["model"] in CONTROLNETS
        spec["preprocessor"] = {"_target_": "camouflage_train.pipelines.controls.CannyEdges"}
    model["backbone"]["weight_dtype"] = "fp32"
    model.update(num_inference_steps=2, strength=0.5)
    base = instantiate(model)
    assert len(base.controls) == 5 and base.reconstruction is not None
    image = Image.new("RGB", (64, 64), (120, 90, 60))
    persons = PersonBatch(
        torch.tensor([[[0.3, 0.3, 0.7, 0.7]]]),
        torch.zeros(1, 1, 0),
        torch.zeros(1, 1, 0),
        torch.ones(1, 1, dtype=torch.bool),
    )
    out = base([image], persons, seeds=[0], prompts=[""])
    assert out[0].size == (64, 64)
    assert hub.served[TILE] == {"config.json", "diffusion_pytorch_model.bin"}


def test_a_missing_repository_stops_base_before_any_download(hub: StandinHub, tmp_path: Path) -> None:
    from camouflage_train.pipelines.base import check_sources

    controlnets = {name: {"model": repo} for name, repo in zip(["a", "b"], CONTROLNETS[:2], strict=True)}
    with pytest.raises(BackboneUnavailableError, match=r"someone/no-such-controlnet.*model\.anonymization\.model"):
        check_sources(
            {"pretrained_model_name_or_path": SD15},
            controlnets,
            {"enabled": True, "model": "someone/no-such-controlnet"},
        )
    assert hub.served == {}, "files were downloaded before the configuration was checked"


def test_cache_dir_is_where_hub_downloads_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """backbone.cache_dir reaches the hub client (it was dropped before)."""
    seen: list = []
    hub = StandinHub(tmp_path / "hub")
    hub.add(SD15, _sd_standin(tmp_path / "repos"))
    original = hub.snapshot_download

    def recording(repo_id, **kwargs):
        seen.append(kwargs.get("cache_dir"))
        return original(repo_id, **kwargs)

    hub.snapshot_download = recording
    hub.install(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_frozen_backbone(SD15, cache_dir=str(tmp_path / "my-cache"))
    assert seen == [str(tmp_path / "my-cache")]


def test_annotators_fetch_the_files_each_base_preprocessor_reads_from_the_real_layout(tmp_path, monkeypatch):
    from camouflage_train.pipelines.controls import ANNOTATORS_REPO, annotator_weights

    annotators = record(ANNOTATORS_REPO)
    hub = StandinHub(tmp_path / "hub")
    hub.add(ANNOTATORS_REPO, build_standin(annotators["files"], tmp_path, tmp_path / "annotators", {}))
    hub.install(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    base = OmegaConf.load(REPO / "configs" / "anonymize" / "model" / "base.yaml")
    used = [spec.preprocessor.processor_id for spec in base.controlnets.values() if "processor_id" in spec.preprocessor]
    assert used
    for processor_id in used:
        folder = annotator_weights(processor_id)
        assert all((folder / name).is_file() for name in annotators["uses"][processor_id])
    assert hub.served[ANNOTATORS_REPO] == {name for pid in used for name in annotators["uses"][pid]}


def test_upernet_segmentation_loads_its_bin_only_layout_onto_the_chosen_device(tmp_path, monkeypatch):
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    from camouflage_train.pipelines.controls import UperNetSegmentation

    repo = "openmmlab/upernet-convnext-small"
    backbone = ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    tiny = tmp_path / "tiny-upernet"
    UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32, num_labels=150)
    ).save_pretrained(tiny)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tiny)
    hub = StandinHub(tmp_path / "hub")
    hub.add(repo, build_standin(record(repo)["files"], tiny, tmp_path / "upernet", {"": tiny}))  # weights as .bin
    hub.install(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    segmentation = UperNetSegmentation(repo, device="auto")
    model = segmentation.load()
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert hub.served[repo] == {"config.json", "preprocessor_config.json", "pytorch_model.bin"}
    inputs = segmentation._processor(images=Image.new("RGB", (64, 64)), return_tensors="pt")
    assert model(**inputs).logits.shape[1] == 150


def test_a_gated_repository_is_one_line_saying_what_to_accept_and_how_to_log_in(hub: StandinHub):
    hub.gated.add(SD15)
    with pytest.raises(BackboneUnavailableError) as caught:
        load_frozen_backbone(SD15)
    message = str(caught.value)
    assert "\n" not in message and f"https://huggingface.co/{SD15}" in message and "hf auth login" in message
    assert SD15 not in hub.served


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", None])
def test_the_body_detector_reads_its_real_layout_and_a_layout_without_weights_stops_before_any_download(
    tmp_path, monkeypatch, weights
):
    """hustvl/yolos-tiny as recorded (both weight formats: the safetensors file is fetched), as if it had only the
    pickle ``.bin`` (read with weights_only), and without weights (one error naming bodies.model, nothing
    fetched). The stand-in carries the tiny YOLOS of ``bodies=tiny`` in the recorded file names."""
    import os

    from camouflage_train.annotation.bodies import DEFAULT_REPOSITORY, BodyDetector
    from camouflage_train.stand_ins.body_detector import tiny_body_detector

    files = record(DEFAULT_REPOSITORY)["files"]
    assert {"config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"} <= set(files)
    if weights == "pytorch_model.bin":
        files = [name for name in files if name != "model.safetensors"]
    elif weights is None:
        files = [name for name in files if name not in ("model.safetensors", "pytorch_model.bin")]
    tiny = Path(tiny_body_detector(os.environ["CAMOUFLAGE_CACHE"]))
    hub = StandinHub(tmp_path / "hub")
    hub.add(DEFAULT_REPOSITORY, build_standin(files, tiny, tmp_path / "yolos-tiny", {"": tiny}))
    hub.install(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if weights is None:
        with pytest.raises(
            HubLayoutError, match=r"hustvl/yolos-tiny.*model\.safetensors or pytorch_model\.bin.*bodies"
        ):
            BodyDetector(DEFAULT_REPOSITORY)
        assert hub.served == {}
        return
    detector = BodyDetector(DEFAULT_REPOSITORY, score_threshold=0.0, device="cpu")
    assert hub.listings == 1 and hub.served == {}, "the file list is read first, nothing is fetched yet"
    boxes = detector(Image.new("RGB", (96, 64), (150, 110, 90)))
    assert hub.served[DEFAULT_REPOSITORY] == {"config.json", "preprocessor_config.json", weights}
    assert detector.person_labels == [1] and boxes
    reference = BodyDetector(str(tiny), score_threshold=0.0, device="cpu")(Image.new("RGB", (96, 64), (150, 110, 90)))
    assert boxes == reference, "the same weights, read from either format"
