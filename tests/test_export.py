import hashlib
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from camouflage_train.data.schema import AttributeSchema
from camouflage_train.data.synthetic import draw_scene
from camouflage_train.export import ExportError, export_adapter
from camouflage_train.inference import load_attribute_encoder, person_inputs
from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.pipelines.base import build_controls, control_kwargs
from camouflage_train.pipelines.controls import CannyEdges
from camouflage_train.pipelines.light import CamouflageLight, generate_light
from tests.conftest import assert_user_error, run_script


def _records(schema):
    scenes = [draw_scene(seed, schema, 64) for seed in (11, 12)]
    return [image for image, _ in scenes], [persons for _, persons in scenes]


def _stock_images(pipe, folder, records, weight_name, seeds, **kwargs):
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    embeds, attention = person_inputs(
        load_attribute_encoder(folder),
        records,
        64,
        64,
        unconditional_half=True,
        vae_scale_factor=pipe.vae_scale_factor,
        folder=folder,
    )
    return pipe(
        ["a photo of people"] * len(records),
        negative_prompt=[""] * len(records),
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        ip_adapter_image_embeds=embeds,
        cross_attention_kwargs=attention,
        **kwargs,
    ).images


def _ours(checkpoint, records, schema, seeds, controls=()):
    """The project's Light path: a training checkpoint loaded by CamouflageLight, generating through
    ``generate_light`` (masks and embeddings built by the training code)."""
    light = CamouflageLight.from_checkpoint(str(checkpoint), controls=controls)
    light.pipe.set_progress_bar_config(disable=True)
    arrays = [schema.to_arrays(persons, "x") for persons in records]
    persons = PersonBatch(
        *(
            torch.from_numpy(np.stack([getattr(a, f) for a in arrays]))
            for f in ("boxes", "continuous", "categorical", "mask", "extents")
        )
    )
    extra = control_kwargs(controls, _records(schema)[0]) if controls else {}
    return generate_light(
        light.pipe,
        light.encoder,
        light.adapter_config,
        persons,
        ["a photo of people"] * 2,
        64,
        64,
        num_inference_steps=3,
        guidance_scale=5.0,
        seeds=seeds,
        negative_prompt="",
        output_type="np",
        **extra,
    )


def test_export_round_trip_with_stock_diffusers(trained_checkpoint, tmp_path, schema, tiny_model_dir):
    checkpoint, module = trained_checkpoint
    folder = export_adapter(checkpoint, tmp_path / "export", base_model="preset:tiny")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "README.md",
        "attribute_encoder",
        "config.json",
        "export_manifest.json",
        "ip-adapter_camouflage.bin",
        "ip-adapter_camouflage.safetensors",
    ]
    flat = load_file(folder / "ip-adapter_camouflage.safetensors")
    keys = sorted({k.split(".")[1] for k in flat if k.startswith("ip_adapter.")}, key=int)
    assert keys == ["1", "3", "5", "7", "9", "11"] and "image_proj.proj.0.weight" in flat
    config = json.loads((folder / "config.json").read_text())
    assert config["base_model"] == "preset:tiny" and config["max_persons"] == 4 and config["tokens_per_person"] == 2
    assert (folder / "README.md").read_text().startswith("---\nbase_model: preset:tiny")

    face_schema = module.schema
    _, records = _records(face_schema)
    seeds = [3, 4]
    ours = np.stack(_ours(checkpoint, records, face_schema, seeds))
    for weight_name in ("ip-adapter_camouflage.safetensors", "ip-adapter_camouflage.bin"):
        pipe = StableDiffusionPipeline.from_pretrained(
            tiny_model_dir, safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        stock = _stock_images(pipe, folder, records, weight_name, seeds)
        assert np.abs(stock - ours).max() <= 1e-5, weight_name

    controls = build_controls(
        {"canny": {"model": "preset:tiny-controlnet-1", "preprocessor": CannyEdges()}}, "fp32", None
    )
    ours_cn = np.stack(_ours(checkpoint, records, face_schema, seeds, controls))
    images, _ = _records(face_schema)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_model_dir, controlnet=[c.controlnet for c in controls], safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    stock_cn = _stock_images(
        pipe, folder, records, "ip-adapter_camouflage.safetensors", seeds, **control_kwargs(controls, images)
    )
    assert np.abs(stock_cn - ours_cn).max() <= 1e-5


def test_export_refuses_overwrite_and_foreign_base(trained_checkpoint, tmp_path):
    checkpoint, _ = trained_checkpoint
    with pytest.raises(ExportError, match="trained on the frozen base 'preset:tiny'"):
        export_adapter(checkpoint, tmp_path / "e", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert not (tmp_path / "e").exists()
    export_adapter(checkpoint, tmp_path / "e")
    with pytest.raises(ExportError, match="holds an earlier export"):
        export_adapter(checkpoint, tmp_path / "e")
    export_adapter(checkpoint, tmp_path / "e", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".e-")], "no staging folder may be left"


def test_model_card_snippet_runs_as_written_and_matches_the_light_pipeline(trained_checkpoint, tmp_path):
    checkpoint, module = trained_checkpoint
    folder = export_adapter(checkpoint, tmp_path / "export")
    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "folder=folder" in code and "vae_scale_factor=pipe.vae_scale_factor" in code  # region masks, latent size
    namespace: dict = {}
    exec(compile(code, "model card snippet", "exec"), namespace)  # as written, nothing substituted
    snippet = np.asarray(namespace["image"]).astype(int)
    assert snippet.shape == (64, 64, 3)  # the export's training resolution, not SD 1.5's 512

    light = CamouflageLight.from_checkpoint(str(checkpoint))
    arrays = [module.schema.to_arrays(persons, "card") for persons in namespace["records"]]
    persons = PersonBatch(
        *(
            torch.from_numpy(np.stack([getattr(a, f) for a in arrays]))
            for f in ("boxes", "continuous", "categorical", "mask", "extents")
        )
    )
    ours = generate_light(
        light.pipe, light.encoder, light.adapter_config, persons, ["a photo of people"], 64, 64, seeds=[0]
    )[0]
    # The same float maths (<= 1e-5 apart, see the round-trip test) through an 8-bit image: at most one rounding step.
    gap = np.abs(snippet - np.asarray(ours).astype(int))
    assert gap.max() <= 1 and gap.mean() < 0.01, (gap.max(), gap.mean())


@pytest.mark.slow
def test_export_cli_replaces_only_an_earlier_export_and_follows_the_umask(trained_checkpoint, tmp_path):
    checkpoint, _ = trained_checkpoint

    def export(output, *extra):
        return run_script(
            "export.py", f"checkpoint={checkpoint}", f"output={output}", *extra, f"hydra.run.dir={tmp_path}/run"
        )

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("hi")
    # A folder of other files: the first message says it is never replaced (not "pass overwrite=true").
    assert_user_error(export(notes), f"output: {notes} exists and is not a folder written by export.py")
    assert_user_error(
        export(notes, "overwrite=true"), f"output: {notes} exists and is not a folder written by export.py"
    )
    assert (notes / "notes.txt").read_text() == "hi"

    folder = tmp_path / "export"
    previous = os.umask(0o022)
    try:
        assert export(folder).returncode == 0
    finally:
        os.umask(previous)
    for path in [folder, *folder.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    assert_user_error(export(folder), f"output: {folder} holds an earlier export; pass overwrite=true")
    (folder / "attribute_encoder" / "mine.txt").write_text("keep")
    assert_user_error(
        export(folder, "overwrite=true"), "holds files the export did not write (attribute_encoder/mine.txt)"
    )
    (folder / "attribute_encoder" / "mine.txt").unlink()
    assert export(folder, "overwrite=true").returncode == 0
    manifest = json.loads((folder / "export_manifest.json").read_text())
    assert set(manifest["files"]) == {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "export_manifest.json"
    }


def test_readme_code_is_the_model_card_code_for_sd15(schema):
    """docs/export.md's stock-diffusers example is what an SD 1.5 export's model card says (that code runs, above)."""
    from camouflage_train.export import anonymizer_config, model_card_snippet, sampler_settings
    from tests.conftest import REPO

    guide = (REPO / "docs" / "export.md").read_text()
    section = guide.split("## Exporting an adapter for stock diffusers", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    face = AttributeSchema.from_config(yaml.safe_load((REPO / "configs/attributes/face.yaml").read_text()))
    config = {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "resolution": 512,
        "schema": face.to_config(),
    }
    sampler = sampler_settings(anonymizer_config("light", REPO / "configs"))
    assert code == model_card_snippet(config, "exports/camouflage-light", sampler)


# Pushing to the Hugging Face hub. The hub cannot be reached from the tests: huggingface_hub.HfApi is replaced by a
# stand-in that keeps each pushed repository as a folder ("remote"), and refuses an upload into a repository that was
# never created, as the hub does.


class _StandinHub:
    def __init__(self, root):
        self.root = root
        self.calls = []
        self.private = {}
        self.unreachable = False

    def remote(self, repo_id, revision="main"):
        return self.root / repo_id / revision


def _install_hub(monkeypatch, tmp_path, token="hf_standin"):
    """The stand-in hub, with the environment of a logged-in user online (the suite runs with HF_HUB_OFFLINE=1)."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import CommitInfo, RepoUrl, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    hub = _StandinHub(tmp_path / "remote")

    class StandinApi(huggingface_hub.HfApi):
        def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False, **kwargs):
            hub.calls.append(
                ("create_repo", repo_id, {"private": private, "repo_type": repo_type, "exist_ok": exist_ok})
            )
            hub.private.setdefault(repo_id, private)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
            hub.calls.append(("create_branch", repo_id, {"branch": branch, "exist_ok": exist_ok}))

        def upload_folder(self, *, repo_id, folder_path, commit_message=None, revision=None, **kwargs):
            hub.calls.append(("upload_folder", repo_id, {"revision": revision, "commit_message": commit_message}))
            url = f"https://huggingface.co/api/models/{repo_id}/commit/{revision or 'main'}"
            if hub.unreachable:
                raise httpx2.ConnectError("[Errno 111] Connection refused", request=httpx2.Request("POST", url))
            if repo_id not in hub.private:
                raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for url: {url}")
            shutil.copytree(folder_path, hub.remote(repo_id, revision or "main"), dirs_exist_ok=True)
            oid = f"{len(hub.calls):040x}"
            return CommitInfo(f"https://huggingface.co/{repo_id}/commit/{oid}", commit_message, "", oid)

    monkeypatch.setattr(huggingface_hub, "HfApi", StandinApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))  # no cached login
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    return hub


def _export_cfg(checkpoint, output, *overrides):
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(
            "export.yaml",
            overrides=[f"checkpoint={checkpoint}", f"output={output}", "anonymizer=light_tiny", *overrides],
        )


def _files(folder):
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


def _assert_remote_is_the_export(remote, folder):
    """The remote copy holds the model card, the weights and every file of the manifest with its SHA-256."""
    manifest = json.loads((folder / "export_manifest.json").read_text())
    files = _files(remote)
    assert set(files) == {*manifest["files"], "export_manifest.json"}
    for name, sha in manifest["files"].items():
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == sha, name
    assert files["README.md"].read_text().startswith("---\nbase_model: preset:tiny\n")
    weights = load_file(files["ip-adapter_camouflage.safetensors"])
    assert "image_proj.proj.0.weight" in weights and any(key.startswith("ip_adapter.1.") for key in weights)


def test_export_pushes_the_finished_folder_with_its_model_card_to_the_hub(
    trained_checkpoint, tmp_path, monkeypatch, capsys
):
    from camouflage_train.export import run_export

    checkpoint, _ = trained_checkpoint
    hub = _install_hub(monkeypatch, tmp_path)
    folder = run_export(_export_cfg(checkpoint, tmp_path / "export", "hub.repo_id=someone/camouflage-light"))

    assert [call[0] for call in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2] == {"private": True, "repo_type": "model", "exist_ok": True}  # private unless asked
    _assert_remote_is_the_export(hub.remote("someone/camouflage-light"), folder)
    assert "https://huggingface.co/someone/camouflage-light/commit/" in capsys.readouterr().out

    # The pushed card's code runs as written: it downloads the export from its repository.
    import huggingface_hub

    downloads = []

    def snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs))
        return str(hub.remote(repo_id, kwargs.get("revision") or "main"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    card = (hub.remote("someone/camouflage-light") / "README.md").read_text()
    namespace: dict = {}
    exec(compile(card.split("```python\n", 1)[1].split("```", 1)[0], "pushed model card", "exec"), namespace)
    assert downloads == [("someone/camouflage-light", {})]
    assert np.asarray(namespace["image"]).shape == (64, 64, 3)


def test_a_failed_push_keeps_the_export_and_the_same_command_pushes_it_without_exporting_again(
    trained_checkpoint, tmp_path, monkeypatch
):
    from camouflage_train.export import PushError, run_export

    checkpoint, _ = trained_checkpoint
    hub = _install_hub(monkeypatch, tmp_path)
    hub.unreachable = True
    output = tmp_path / "export"
    push = ("hub.repo_id=someone/camouflage-light", "hub.revision=v1", "hub.private=false")
    with pytest.raises(PushError, match="Connection refused") as failed:
        run_export(_export_cfg(checkpoint, output, *push))
    assert f"The export in {output} is complete and kept: run the same command again" in str(failed.value)
    manifest = json.loads((output / "export_manifest.json").read_text())
    local = _files(output)
    assert set(local) == {*manifest["files"], "export_manifest.json"}
    assert all(hashlib.sha256(local[name].read_bytes()).hexdigest() == sha for name, sha in manifest["files"].items())
    written = {name: path.stat().st_mtime_ns for name, path in local.items()}

    hub.unreachable = False
    hub.calls.clear()
    assert run_export(_export_cfg(checkpoint, output, *push)) == output
    assert {name: path.stat().st_mtime_ns for name, path in _files(output).items()} == written  # not exported again
    assert [call[0] for call in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.private["someone/camouflage-light"] is False and hub.calls[2][2]["revision"] == "v1"
    _assert_remote_is_the_export(hub.remote("someone/camouflage-light", "v1"), output)

    # Other settings are another export: it is never pushed in place of the kept one.
    with pytest.raises(ExportError, match="holds an earlier export; pass overwrite=true"):
        run_export(_export_cfg(checkpoint, output, *push, "dataset=other"))
    # A kept export whose files changed is not pushed.
    (output / "config.json").write_text("{}")
    with pytest.raises(ExportError, match=r"no longer matches its export_manifest.json .*config.json"):
        run_export(_export_cfg(checkpoint, output, *push))


@pytest.mark.parametrize(
    ("setting", "error", "message"),
    [
        ("hub.repo_id=camouflage-light", "ConfigError", "hub.repo_id: 'camouflage-light' is not a Hugging Face"),
        ("hub.repo_id=someone/camouflage--light", "ConfigError", "write owner/name"),
        ("offline", "PushError", "an upload cannot happen offline"),
        ("no token", "PushError", "no Hugging Face token is set: log in once with `hf auth login`"),
    ],
)
def test_a_push_that_cannot_happen_is_refused_before_the_checkpoint_is_read(
    setting, error, message, tmp_path, monkeypatch
):
    from camouflage_train.errors import UserError
    from camouflage_train.export import run_export

    hub = _install_hub(monkeypatch, tmp_path, token=None if setting == "no token" else "hf_standin")
    if setting == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")  # reading it would be a checkpoint error, not the push's
    repo = setting if setting.startswith("hub.") else "hub.repo_id=someone/camouflage-light"
    with pytest.raises(UserError) as refused:
        run_export(_export_cfg(garbage, tmp_path / "export", repo))
    assert type(refused.value).__name__ == error and message in str(refused.value)
    if setting == "no token":
        assert "HF_TOKEN" in str(refused.value)
    assert not (tmp_path / "export").exists() and hub.calls == []
