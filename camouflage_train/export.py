"""Turn a training checkpoint into an export folder that stock diffusers loads.

The folder holds:

* ``ip-adapter_camouflage.safetensors``: ``image_proj.*`` + ``ip_adapter.*`` keys (FaceID projection layout,
  cross-attention keys numbered 1, 3, 5, ...) for ``pipe.load_ip_adapter(folder, subfolder="",
  weight_name=...)``; and ``ip-adapter_camouflage.bin``, the same tensors as the legacy
  ``{"image_proj", "ip_adapter"}`` dict;
* ``attribute_encoder/``: person records -> the embeddings passed as ``ip_adapter_image_embeds``
  (safetensors + config.json; see :mod:`camouflage_train.inference` to use it without the training stack);
* ``config.json``: base model, resolution, attribute schema, tokens per person, max persons, the adapter's
  ``scale`` (stock ``load_ip_adapter`` sets 1.0: the model card's code sets this one), config hash;
* ``README.md``: a model card with Hugging Face front matter, a runnable snippet, intended use and limitations;
* ``export_manifest.json``: every file above with its SHA-256, the marker that this folder is an export, and what
  it was made from (the checkpoint's SHA-256, the model card's settings).

Everything is written to a temporary folder and renamed at the end; an existing folder is kept unless
``overwrite``, and even then only a folder this exporter wrote (its manifest lists every file in it) is
replaced: a folder holding anything else is refused, so ``overwrite=true`` never deletes a user's files.
A checkpoint trained on another base model than ``base_model`` is refused.

With ``hub.repo_id=<owner>/<name>`` the finished folder is then pushed to that Hugging Face model repository
(:func:`push_export`: the repository is created if missing, private unless ``hub.private=false``, and the folder is
uploaded as one commit whose URL is printed); the model card's code then downloads the export from there. A push that
cannot happen is refused before the checkpoint is read: a ``hub.repo_id`` that is not ``owner/name``, offline mode
(``HF_HUB_OFFLINE``), no token (``hf auth login`` or ``HF_TOKEN``; never a config key, configs are saved with every
run). Only a folder whose files match its manifest is pushed. A push that fails (network, permissions) leaves the
export in place: the same command run again finds that export made from the same checkpoint and settings and pushes
it as it is, without exporting again (``overwrite=true`` exports again first).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_file

from camouflage_train.errors import UserError
from camouflage_train.models.adapter_checkpoint import NotALightCheckpoint, read_metadata
from camouflage_train.models.attribute_encoder import AttributeEncoder, encoder_state_dict
from camouflage_train.models.ip_adapter import AdapterConfig, checkpoint_state_dict
from camouflage_train.pipelines.sampling import SAMPLING
from camouflage_train.utils.atomic import atomic_folder
from camouflage_train.utils.checkpoints import read_checkpoint
from camouflage_train.utils.hub import HubError, first_line, network_errors
from camouflage_train.utils.paths import file_sha256

log = logging.getLogger(__name__)

WEIGHT_NAME = "ip-adapter_camouflage"
# What the model card's code takes from the anonymizer config.
_SAMPLER_KEYS = ("scheduler", "num_inference_steps", "guidance_scale", "negative_prompt", "keep_background")
MANIFEST = "export_manifest.json"
_TOOL = "camouflage-train export"


class ExportError(UserError, ValueError):
    """The checkpoint cannot be exported as asked; the message says why."""


class PushError(HubError):
    """The export cannot be pushed to the Hugging Face hub (offline, no token, the upload failed); the message says
    what to do."""


@dataclass
class HubSettings:
    """The ``hub`` keys of ``configs/export.yaml``: where :func:`push_export` pushes the finished export.

    Args:
        repo_id: the model repository, ``owner/name`` (``None``: export only, push nothing).
        private: create the repository private; a repository that already exists keeps its visibility.
        revision: the branch to push to, created from the default branch when missing (``None``: the default branch).
        commit_message: the commit's message.
    """

    repo_id: str | None = None
    private: bool = True
    revision: str | None = None
    commit_message: str = "Upload a CAMOUFLaGE-Light adapter exported by camouflage-train"


@dataclass
class ExportConfig:
    """The keys of ``configs/export.yaml`` (``export.py``).

    Args:
        checkpoint: the Light training checkpoint.
        output: the export folder.
        base_model: refuse unless the adapter was trained on this base (``None``: the anonymizer config's, if any).
        overwrite: replace an earlier export in ``output``.
        dataset: the training data's name, for the model card.
        anonymizer: the Light anonymizer config (a name in ``configs/anonymize/model/``, or a ``.yaml`` file) whose
            sampler, steps, guidance and negative prompt the model card's code uses.
        task_name: the run folder's name under ``logs/``.
        paths: the paths group.
        hub: where to push the finished export (:class:`HubSettings`; no ``repo_id``: no push).
    """

    checkpoint: str
    output: str
    base_model: str | None = None
    overwrite: bool = False
    dataset: str | None = None
    anonymizer: str = "light"
    task_name: str = "export"
    paths: Any = None
    hub: HubSettings = field(default_factory=HubSettings)


def _attribute_names(schema: dict[str, Any]) -> list[str]:
    return [a["name"] for a in schema["continuous"]] + [a["name"] for a in schema["categorical"]]


def _example_record(schema: dict[str, Any]) -> dict[str, Any]:
    """One valid person record for the model card: a centred box, mid-range values, the first classes."""
    record: dict[str, Any] = {"box": [0.3, 0.2, 0.6, 0.7]}
    for attribute in schema["continuous"]:
        record[attribute["name"]] = round((attribute["low"] + attribute["high"]) / 2, 1)
    for attribute in schema["categorical"]:
        record[attribute["name"]] = attribute["classes"][0]
    return record


def model_card_snippet(
    config: dict[str, Any],
    folder: str | Path,
    sampler: Mapping[str, Any],
    repo_id: str | None = None,
    revision: str | None = None,
) -> str:
    """Python that generates one image with this export and stock diffusers, runnable as written on a GPU or
    a CPU (tested on the demo's export as the card prints it, and on a pushed card through a stand-in hub).

    Args:
        config: the export's ``config.json``.
        folder: where the export will be.
        sampler: the anonymizer config whose sampler, steps, guidance and negative prompt the card uses
            (``export.py``'s ``anonymizer``, one of ``configs/anonymize/model/light*.yaml``).
        repo_id: the hub repository the export is pushed to: the code downloads it from there instead of reading
            ``folder`` (``None``: a local export).
        revision: the branch it is pushed to (``None``: the default branch).
    """
    base = str(config["base_model"])
    size = config.get("resolution") or 512
    imports, load_base = "", f"base = {json.dumps(base)}"
    if base.startswith("preset:"):  # the project's offline test models: built locally, not on the hub
        imports = "from camouflage_train.models.presets import materialize_preset\n"
        load_base = f"base = materialize_preset({json.dumps(base.removeprefix('preset:'))})"
    load_folder = f"folder = {json.dumps(str(folder))}  # the export folder"
    if repo_id is not None:
        imports = f"from huggingface_hub import snapshot_download\n{imports}"
        branch = f", revision={json.dumps(revision)}" if revision else ""
        load_folder = f"folder = snapshot_download({json.dumps(repo_id)}{branch})  # the export, from the hub"
    scheduler = dict(sampler.get("scheduler") or {"name": "DDIMScheduler"})
    name = scheduler.pop("name")
    options = "".join(f", {key}={value!r}" for key, value in scheduler.items())
    note = ""
    if sampler.get("keep_background"):
        note = (
            "# This draws the whole image. anonymize.py with this config keeps the real scene outside the person\n"
            "# regions (keep_background), which stock diffusers does not do: its steps and guidance were chosen so.\n"
        )
    negative = sampler.get("negative_prompt")
    negative_line = f"\n    negative_prompt=[{json.dumps(negative)}]," if negative else ""
    return f"""import torch
from diffusers import {name}, StableDiffusionPipeline

from camouflage_train.inference import load_attribute_encoder, person_inputs
{imports}
{load_base}
{load_folder}
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32  # half precision only on a GPU
pipe = StableDiffusionPipeline.from_pretrained(
    base, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
).to(device)
pipe.scheduler = {name}.from_config(pipe.scheduler.config{options})  # the anonymizer config's sampler
pipe.load_ip_adapter(folder, subfolder="", weight_name="{WEIGHT_NAME}.safetensors", image_encoder_folder=None)
pipe.set_ip_adapter_scale({float(config.get("scale", 1.0))!r})  # the adapter's scale in training (config.json)
encoder = load_attribute_encoder(folder)
# One list of person records per image; folder= applies the export's region masks.
records = [[{json.dumps(_example_record(config["schema"]))}]]
embeds, kwargs = person_inputs(
    encoder,
    records,
    {size},
    {size},
    unconditional_half=True,
    vae_scale_factor=pipe.vae_scale_factor,
    folder=folder,
    device=pipe.device,
    dtype=pipe.dtype,
)
{note}image = pipe(
    [{json.dumps(SAMPLING.prompt)}],{negative_line}
    height={size},
    width={size},
    num_inference_steps={int(sampler.get("num_inference_steps", SAMPLING.num_inference_steps))},
    guidance_scale={float(sampler.get("guidance_scale", SAMPLING.guidance_scale))!r},
    generator=torch.Generator(device).manual_seed(0),
    ip_adapter_image_embeds=embeds,
    cross_attention_kwargs=kwargs,
).images[0]
"""


def _model_card(
    config: dict[str, Any],
    folder: str | Path,
    sampler: Mapping[str, Any],
    repo_id: str | None = None,
    revision: str | None = None,
) -> str:
    base = config["base_model"]
    bodies = config["schema"].get("body") is not None
    inputs = ", ".join(["box", *(["body"] if bodies else []), *_attribute_names(config["schema"])])
    slots = " and slot (two slots per person: its extent and its face)" if bodies else ""
    return f"""---
base_model: {base}
library_name: diffusers
license: other
tags:
- ip-adapter
- anonymization
- privacy
- camouflage
- stable-diffusion
datasets:
- {config.get("dataset") or "unspecified"}
---

# CAMOUFLaGE-Light adapter

An IP-Adapter-style attribute adapter for `{base}`, trained with camouflage-train. It is conditioned on the
attributes of every person in a scene ({inputs}), never on identity, so the people it draws are new people with
the same attributes and layout; whatever of the scene an application keeps (background, and with a face-only
schema the clothes and body) is kept as it was and can still identify someone.
Up to {config["max_persons"]} persons, {config["tokens_per_person"]} tokens per person{slots}, trained at
{config.get("resolution")} px (training config hash `{config["config_hash"]}`).

## Use with stock diffusers

```python
{model_card_snippet(config, folder, sampler, repo_id, revision)}```

Person records: `{{"box": [x0, y0, x1, y1] (0..1), ...attributes}}` as in `config.json`'s schema.

## Intended use and limitations

Research on attribute-preserving anonymization of people in images. It replaces who is shown, not what is
shown: attributes, pose, clothing, scene and context are kept on purpose and can still identify a person
(a unique tattoo, a known place, a rare combination of attributes). Anonymized images are not guaranteed to
defeat every face recogniser; measure re-identification with several recognisers, including ones not used
during training, before relying on it. Do not use it to deceive or to impersonate, and respect the licences of
the base model and of the training data.
"""


def _check_replaceable(output: Path, overwrite: bool) -> None:
    """An existing ``output`` may be replaced only with ``overwrite`` and only if it is an export whose
    manifest lists every file in it; the first message already says which of the two is missing."""
    if not output.exists():
        return
    try:
        manifest = json.loads((output / MANIFEST).read_text())
        listed, tool = set(manifest["files"]), manifest.get("tool")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, not JSON, not our layout
        listed, tool = None, None
    if listed is None or tool != _TOOL:
        raise ExportError(
            f"output: {output} exists and is not a folder written by export.py (no valid {MANIFEST}), so it is "
            "never replaced: choose another output, or move that folder away"
        )
    if not overwrite:
        raise ExportError(f"output: {output} holds an earlier export; pass overwrite=true to replace it")
    present = {p.relative_to(output).as_posix() for p in output.rglob("*") if not p.is_dir()}
    foreign = sorted(present - listed - {MANIFEST})
    if foreign:
        raise ExportError(
            f"output: {output} holds files the export did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); move them away, then export again"
        )


def _write_manifest(folder: Path, source: dict[str, Any]) -> None:
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"tool": _TOOL, "files": files, "source": source}, indent=2))


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of an export folder, or ``None`` when there is none this exporter wrote."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("tool") != _TOOL or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def export_source(
    checkpoint_path: str | Path,
    dataset: str | None = None,
    sampler: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """What an export is made from, as its manifest records it (``source``): the checkpoint's SHA-256 and every
    setting the written files depend on. Two exports with the same source hold the same files.

    Args:
        checkpoint_path: the Light training checkpoint.
        dataset: the training data's name, for the model card.
        sampler: the anonymizer config's sampler settings, for the model card.
        repo_id: the hub repository the model card's code downloads from (``None``: none).
        revision: its branch (``None``: the default branch).
    """
    source = {
        "checkpoint_sha256": file_sha256(Path(checkpoint_path)),
        "dataset": dataset,
        "sampler": dict(sampler or {}),
        "hub": {"repo_id": repo_id, "revision": revision} if repo_id is not None else None,
    }
    return json.loads(json.dumps(source))  # as it reads back from the manifest (tuples become lists, ...)


def verify_export(folder: str | Path) -> dict[str, str]:
    """Check that ``folder`` is a complete export: a manifest this exporter wrote that lists every other file in it,
    each with its SHA-256; return that list (file -> SHA-256).

    Args:
        folder: the export folder.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise ExportError(f"output: {folder} is not a folder written by export.py (no valid {MANIFEST})")
    files: dict[str, str] = manifest["files"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    changed = sorted(
        (set(files) ^ present) | {name for name in set(files) & present if file_sha256(folder / name) != files[name]}
    )
    if changed:
        raise ExportError(
            f"output: {folder} no longer matches its {MANIFEST} (missing, added or changed: {', '.join(changed[:5])}"
            f"{', ...' if len(changed) > 5 else ''}); export it again with overwrite=true"
        )
    return files


def exported_from(folder: str | Path, source: Mapping[str, Any]) -> bool:
    """Whether ``folder`` holds an export made from ``source`` (:func:`export_source`) whose files match its
    manifest, i.e. what exporting again would write.

    Args:
        folder: the export folder.
        source: what the export must have been made from.
    """
    manifest = _read_manifest(Path(folder))
    if manifest is None or manifest.get("source") != source:
        return False
    verify_export(folder)
    return True


def export_adapter(
    checkpoint_path: str | Path,
    output: str | Path,
    base_model: str | None = None,
    overwrite: bool = False,
    dataset: str | None = None,
    sampler: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
) -> Path:
    """Write the export folder for ``checkpoint_path`` into ``output``; return ``output``.

    Args:
        checkpoint_path: the Light training checkpoint.
        output: the export folder.
        base_model: refuse unless the adapter was trained on this base (``None``: any).
        overwrite: replace an earlier export (only a folder this exporter wrote).
        dataset: the training data's name, for the model card.
        sampler: the anonymizer config whose sampler settings the model card's code uses (``scheduler``,
            ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, ``keep_background``; ``None``: DDIM and
            the project's sampling defaults).
        repo_id: the hub repository the export will be pushed to, whose files the model card's code downloads
            (``None``: the card reads ``output``).
        revision: the branch it will be pushed to (``None``: the default branch).
    """
    output = Path(output)
    _check_replaceable(output, overwrite)
    checkpoint = read_checkpoint(checkpoint_path)
    try:
        meta = read_metadata(checkpoint, checkpoint_path)
    except NotALightCheckpoint as error:
        raise ExportError(str(error)) from None
    if base_model is not None and base_model != meta["backbone"]:
        raise ExportError(
            f"{checkpoint_path} was trained on the frozen base '{meta['backbone']}', not '{base_model}': "
            "an adapter only works with the UNet it was trained on"
        )
    adapter = AdapterConfig(**meta["adapter"])  # the defaults fill what an older checkpoint did not record
    if not math.isfinite(adapter.scale):
        raise ExportError(f"checkpoint: {checkpoint_path} records adapter.scale={adapter.scale}, not a finite number")
    try:
        state = checkpoint_state_dict(checkpoint)
    except ValueError as error:
        raise ExportError(f"checkpoint: {checkpoint_path}: {error}") from None
    encoder = AttributeEncoder.from_adapter_config(meta["schema"], adapter)
    encoder.load_state_dict(encoder_state_dict(checkpoint))
    config = {
        "format": 1,
        "base_model": meta["backbone"],
        "resolution": meta.get("resolution"),
        "schema": meta["schema"],
        "max_persons": meta["schema"]["max_persons"],
        "tokens_per_person": adapter.tokens_per_person,
        "embed_dim": adapter.embed_dim,
        "scale": adapter.scale,
        "region_masks": adapter.region_masks,
        "region_expand": adapter.region_expand,
        "region_overlap": adapter.region_overlap,
        "face_expand": adapter.face_expand,
        "config_hash": meta.get("config_hash"),
        "global_step": checkpoint.get("global_step"),
        "weight_name": f"{WEIGHT_NAME}.safetensors",
        "dataset": dataset,
    }
    with atomic_folder(output, replace=True) as staging:
        flat = {f"{group}.{k}": v for group, tensors in state.items() for k, v in tensors.items()}
        save_file(flat, str(staging / f"{WEIGHT_NAME}.safetensors"), metadata={"format": "pt"})
        torch.save(state, staging / f"{WEIGHT_NAME}.bin")
        encoder.save_pretrained(staging / "attribute_encoder")
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "README.md").write_text(_model_card(config, output, sampler or {}, repo_id, revision))
        _write_manifest(staging, export_source(checkpoint_path, dataset, sampler, repo_id, revision))
    return output


def anonymizer_config(name: str, config_dir: Path) -> Any:
    """The anonymizer config ``name``: ``<config_dir>/anonymize/model/<name>.yaml``, or a ``.yaml`` file.

    Args:
        name: a config name or a file.
        config_dir: the project's ``configs/`` folder.
    """
    folder = config_dir / "anonymize" / "model"
    path = Path(name) if name.endswith((".yaml", ".yml")) else folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("light*.yaml"))
        raise ExportError(f"anonymizer: '{name}' is not a config in {folder} ({', '.join(known)}) or a .yaml file")
    return OmegaConf.load(path)


def sampler_settings(anonymizer: Any) -> dict[str, Any]:
    """What the model card's code takes from an anonymizer config: its sampler, steps, guidance, negative prompt,
    and whether it keeps the scene outside the persons (said in a comment: stock diffusers cannot).

    Args:
        anonymizer: :func:`anonymizer_config`'s result.
    """
    settings = {}
    for key in _SAMPLER_KEYS:
        if key not in anonymizer:
            continue
        try:  # resolved against the whole config: a key may point at another one
            value = anonymizer[key]
            settings[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except OmegaConfBaseException as error:
            raise ExportError(f"anonymizer: its {key} does not resolve ({error})") from None
    return settings


def _offline() -> bool:
    """Whether huggingface_hub is in offline mode: set in the environment now, or when it was imported."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def check_push(hub: HubSettings) -> None:
    """Refuse a push that cannot happen, before any work: a ``repo_id`` that is not ``owner/name``, offline mode,
    no Hugging Face token. Nothing is sent to the hub here.

    Args:
        hub: the ``hub`` settings (``repo_id`` set).
    """
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from camouflage_train.utils.config_checks import ConfigError

    repo_id = hub.repo_id
    problem = None if isinstance(repo_id, str) and repo_id.count("/") == 1 else "it is not of the form owner/name"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        problem = problem or str(error).rstrip(".")
    if problem is not None:
        raise ConfigError(
            f"hub.repo_id: '{repo_id}' is not a Hugging Face model repository id ({problem}): write owner/name, your "
            "user or organisation name and the model's name (letters, digits, '-', '_', '.')"
        )
    if _offline():
        raise PushError(
            f"hub.repo_id={repo_id} asks for a push, but the Hugging Face hub is in offline mode (HF_HUB_OFFLINE or "
            "TRANSFORMERS_OFFLINE is set) and an upload cannot happen offline: unset it for this run, or drop "
            "hub.repo_id to export only"
        )
    if get_token() is None:
        raise PushError(
            f"hub.repo_id={repo_id} asks for a push, but no Hugging Face token is set: log in once with "
            "`hf auth login` (`huggingface-cli login` with older huggingface_hub) or set HF_TOKEN in the environment, "
            "with a token that may write to that repository (tokens are never config keys)"
        )


def push_export(folder: str | Path, hub: HubSettings) -> str:
    """Push a finished export folder to the hub repository ``hub.repo_id`` (created if missing) as one commit;
    return the commit's URL. The folder is checked against its manifest first; a failed push leaves it as it is.

    Args:
        folder: the export folder (:func:`export_adapter`'s result).
        hub: where to push (:func:`check_push` passed).
    """
    import huggingface_hub

    folder = Path(folder)
    verify_export(folder)
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(hub.repo_id, repo_type="model", private=hub.private, exist_ok=True)
        if hub.revision is not None:
            api.create_branch(hub.repo_id, branch=hub.revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=hub.repo_id,
            folder_path=folder,
            repo_type="model",
            revision=hub.revision,
            commit_message=hub.commit_message,
        )
    except network_errors() as error:  # HTTP errors (401, 403, 5xx) included: huggingface_hub's derive from OSError
        status = getattr(getattr(error, "response", None), "status_code", None)
        access = (
            " Check that your token may write to it (`hf auth whoami`; a fine-grained token needs write access)."
            if status in (401, 403)
            else ""
        )
        raise PushError(
            f"hub.repo_id: pushing {folder} to '{hub.repo_id}' failed ({first_line(error)}).{access} The export in "
            f"{folder} is complete and kept: run the same command again to push it (without overwrite=true it is "
            "pushed as it is, not exported again)"
        ) from error
    url = str(commit.commit_url)
    log.info("pushed %s to %s: %s", folder, hub.repo_id, url)
    return url


def run_export(cfg: Any) -> Path:
    """``export.py``: check the config, the hub push it asks for and the checkpoint path, export, list the written
    files; with ``hub.repo_id``, push the folder and print the commit's URL. A push run whose ``output`` already holds
    this export (same checkpoint and settings, files matching the manifest) pushes it without exporting again,
    unless ``overwrite``.

    Args:
        cfg: the composed ``configs/export.yaml``.
    """
    from camouflage_train.utils.config_checks import validate_config

    validate_config(cfg, ExportConfig)
    hub = HubSettings(**OmegaConf.to_container(cfg.hub, resolve=True)) if cfg.get("hub") is not None else HubSettings()
    if hub.repo_id is not None:
        check_push(hub)
    anonymizer = anonymizer_config(cfg.anonymizer, Path(cfg.paths.root_dir) / "configs")
    expected = {base for base in (cfg.base_model, anonymizer.get("base_model")) if base}
    if len(expected) > 1:
        raise ExportError(
            f"base_model={cfg.base_model} and anonymizer={cfg.anonymizer} (made for {anonymizer.get('base_model')}) "
            "name different bases: drop one, or pick the anonymizer config made for that base"
        )
    base_model = next(iter(expected), None)
    sampler = sampler_settings(anonymizer)
    folder = Path(cfg.output)
    if hub.repo_id is not None and not cfg.overwrite and _already_exported(folder, cfg, sampler, hub):
        exported_base = json.loads((folder / "config.json").read_text()).get("base_model")
        if base_model is not None and base_model != exported_base:  # the check export_adapter makes
            raise ExportError(
                f"{cfg.checkpoint} was trained on the frozen base '{exported_base}', not '{base_model}': it "
                "cannot be pushed as an adapter for that base"
            )
        print(f"{folder} already holds this export (same checkpoint and settings): pushing it as it is")
    else:
        folder = export_adapter(
            cfg.checkpoint,
            cfg.output,
            base_model=base_model,
            overwrite=cfg.overwrite,
            dataset=cfg.dataset,
            sampler=sampler,
            repo_id=hub.repo_id,
            revision=hub.revision,
        )
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>12,d}  {path.relative_to(folder)}")
    if hub.repo_id is not None:
        print(f"pushed {folder} to {hub.repo_id}: {push_export(folder, hub)}")
    return folder


def _already_exported(folder: Path, cfg: Any, sampler: Mapping[str, Any], hub: HubSettings) -> bool:
    """Whether ``folder`` holds the export this run would write (a push run again after a failed push)."""
    if _read_manifest(folder) is None or not Path(cfg.checkpoint).is_file():
        return False  # export_adapter says what is wrong
    return exported_from(folder, export_source(cfg.checkpoint, cfg.dataset, sampler, hub.repo_id, hub.revision))
