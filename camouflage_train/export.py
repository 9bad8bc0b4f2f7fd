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
* ``export_manifest.json``: every file above with its SHA-256, the marker that this folder is an export.

Everything is written to a temporary folder and renamed at the end; an existing folder is kept unless
``overwrite``, and even then only a folder this exporter wrote (its manifest lists every file in it) is
replaced: a folder holding anything else is refused, so ``overwrite=true`` never deletes a user's files.
A checkpoint trained on another base model than ``base_model`` is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
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
from camouflage_train.utils.paths import file_sha256

WEIGHT_NAME = "ip-adapter_camouflage"
# What the model card's code takes from the anonymizer config.
_SAMPLER_KEYS = ("scheduler", "num_inference_steps", "guidance_scale", "negative_prompt", "keep_background")
MANIFEST = "export_manifest.json"
_TOOL = "camouflage-train export"


class ExportError(UserError, ValueError):
    """The checkpoint cannot be exported as asked; the message says why."""


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
    """

    checkpoint: str
    output: str
    base_model: str | None = None
    overwrite: bool = False
    dataset: str | None = None
    anonymizer: str = "light"
    task_name: str = "export"
    paths: Any = None


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


def model_card_snippet(config: dict[str, Any], folder: str | Path, sampler: Mapping[str, Any]) -> str:
    """Python that generates one image with this export and stock diffusers, runnable as written on a GPU or
    a CPU (tested on the demo's export as the card prints it).

    Args:
        config: the export's ``config.json``.
        folder: where the export will be.
        sampler: the anonymizer config whose sampler, steps, guidance and negative prompt the card uses
            (``export.py``'s ``anonymizer``, one of ``configs/anonymize/model/light*.yaml``).
    """
    base = str(config["base_model"])
    size = config.get("resolution") or 512
    imports, load_base = "", f"base = {json.dumps(base)}"
    if base.startswith("preset:"):  # the project's offline test models: built locally, not on the hub
        imports = "from camouflage_train.models.presets import materialize_preset\n"
        load_base = f"base = materialize_preset({json.dumps(base.removeprefix('preset:'))})"
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
folder = {json.dumps(str(folder))}  # the export folder
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


def _model_card(config: dict[str, Any], folder: str | Path, sampler: Mapping[str, Any]) -> str:
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
{model_card_snippet(config, folder, sampler)}```

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


def _write_manifest(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"tool": _TOOL, "files": files}, indent=2))


def export_adapter(
    checkpoint_path: str | Path,
    output: str | Path,
    base_model: str | None = None,
    overwrite: bool = False,
    dataset: str | None = None,
    sampler: Mapping[str, Any] | None = None,
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
        (staging / "README.md").write_text(_model_card(config, output, sampler or {}))
        _write_manifest(staging)
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


def run_export(cfg: Any) -> Path:
    """``export.py``: check the config and the checkpoint path, export, list the written files.

    Args:
        cfg: the composed ``configs/export.yaml``.
    """
    from camouflage_train.utils.config_checks import validate_config

    validate_config(cfg, ExportConfig)
    anonymizer = anonymizer_config(cfg.anonymizer, Path(cfg.paths.root_dir) / "configs")
    expected = {base for base in (cfg.base_model, anonymizer.get("base_model")) if base}
    if len(expected) > 1:
        raise ExportError(
            f"base_model={cfg.base_model} and anonymizer={cfg.anonymizer} (made for {anonymizer.get('base_model')}) "
            "name different bases: drop one, or pick the anonymizer config made for that base"
        )
    base_model = next(iter(expected), None)
    folder = export_adapter(
        cfg.checkpoint,
        cfg.output,
        base_model=base_model,
        overwrite=cfg.overwrite,
        dataset=cfg.dataset,
        sampler=sampler_settings(anonymizer),
    )
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>12,d}  {path.relative_to(folder)}")
    return folder
