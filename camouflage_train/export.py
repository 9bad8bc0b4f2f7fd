"""Turn a training checkpoint into an export folder that stock diffusers loads.

The folder holds:

* ``ip-adapter_camouflage.safetensors``: ``image_proj.*`` + ``ip_adapter.*`` keys (FaceID projection layout,
  cross-attention keys numbered 1, 3, 5, ...) for ``pipe.load_ip_adapter(folder, subfolder="",
  weight_name=...)``; and ``ip-adapter_camouflage.bin``, the same tensors as the legacy
  ``{"image_proj", "ip_adapter"}`` dict;
* ``attribute_encoder/``: person records -> the embeddings passed as ``ip_adapter_image_embeds``
  (safetensors + config.json; see :mod:`camouflage_train.inference` to use it without the training stack);
* ``config.json``: base model, resolution, attribute schema, tokens per person, max persons, config hash;
* ``README.md``: a model card with Hugging Face front matter, intended use and limitations.

Everything is written to a temporary folder and renamed at the end; an existing folder is kept unless
``overwrite``; a checkpoint trained on another base model than ``base_model`` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from camouflage_train.models.attribute_encoder import AttributeEncoder
from camouflage_train.models.ip_adapter import image_proj_to_original
from camouflage_train.utils.atomic import atomic_folder

WEIGHT_NAME = "ip-adapter_camouflage"
_PROJ_PREFIX = "unet.encoder_hid_proj.image_projection_layers.0."


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says why."""


def ip_adapter_state_dict(checkpoint: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's adapter in the original IP-Adapter layout."""
    state, keys = checkpoint["state_dict"], checkpoint["camouflage"]["ip_adapter_keys"]
    image_proj = {k.removeprefix(_PROJ_PREFIX): v for k, v in state.items() if k.startswith(_PROJ_PREFIX)}
    ip_adapter = {}
    for name, key_id in keys.items():
        for kind in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{key_id}.{kind}.weight"] = state[f"unet.{name}.{kind}.0.weight"]
    if not image_proj or len(ip_adapter) != 2 * len(keys):
        raise ExportError("checkpoint holds no complete IP-Adapter (projection or to_k_ip/to_v_ip missing)")
    as_float = lambda d: {k: v.detach().float().contiguous() for k, v in d.items()}  # noqa: E731
    return {"image_proj": as_float(image_proj_to_original(image_proj)), "ip_adapter": as_float(ip_adapter)}


def _attribute_names(schema: dict[str, Any]) -> list[str]:
    return [a["name"] for a in schema["continuous"]] + [a["name"] for a in schema["categorical"]]


def _model_card(config: dict[str, Any]) -> str:
    base = config["base_model"]
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
attributes of every person in a scene ({", ".join(["box", *_attribute_names(config["schema"])])}),
never on identity, so generated images show different people with the same attributes and layout.
Up to {config["max_persons"]} persons, {config["tokens_per_person"]} tokens per person, trained at
{config.get("resolution")} px (training config hash `{config["config_hash"]}`).

## Use with stock diffusers

```python
from diffusers import StableDiffusionPipeline
from camouflage_train.inference import load_attribute_encoder, person_inputs

pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_ip_adapter("<this folder>", subfolder="", weight_name="{WEIGHT_NAME}.safetensors", image_encoder_folder=None)
encoder = load_attribute_encoder("<this folder>")
embeds, kwargs = person_inputs(encoder, [records], height=512, width=512, guidance=True)
image = pipe("a photo of people", ip_adapter_image_embeds=embeds, cross_attention_kwargs=kwargs).images[0]
```

Person records: `{{"box": [x0, y0, x1, y1] (0..1), ...attributes}}` as in `config.json`'s schema.

## Intended use and limitations

Research on attribute-preserving anonymization of people in images. It replaces who is shown, not what is
shown: attributes, pose, clothing, scene and context are kept on purpose and can still identify a person
(a unique tattoo, a known place, a rare combination of attributes). Anonymized images are not guaranteed to
defeat every face recogniser; measure re-identification with several recognisers, including ones not used
during training, before relying on it. Do not use it to deceive or to impersonate, and respect the licences of
the base model and of the training data.
"""


def export_adapter(
    checkpoint_path: str | Path,
    output: str | Path,
    base_model: str | None = None,
    overwrite: bool = False,
    dataset: str | None = None,
) -> Path:
    """Write the export folder for ``checkpoint_path`` into ``output``; return ``output``."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; pass overwrite=true to replace it")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    meta = checkpoint.get("camouflage")
    if not meta or "ip_adapter_keys" not in meta:
        raise ExportError(f"{checkpoint_path} is not a camouflage-train Light checkpoint (format 1 with key map)")
    if base_model is not None and base_model != meta["backbone"]:
        raise ExportError(
            f"{checkpoint_path} was trained on the frozen base '{meta['backbone']}', not '{base_model}': "
            "an adapter only works with the UNet it was trained on"
        )
    adapter = meta["adapter"]
    state = ip_adapter_state_dict(checkpoint)
    encoder = AttributeEncoder(
        schema=meta["schema"],
        embed_dim=adapter["embed_dim"],
        width=adapter["encoder_width"],
        depth=adapter["encoder_depth"],
        fourier_freqs=adapter["fourier_freqs"],
        category_dim=adapter["category_dim"],
    )
    encoder.load_state_dict(
        {k.removeprefix("encoder."): v for k, v in checkpoint["state_dict"].items() if k.startswith("encoder.")}
    )
    config = {
        "format": 1,
        "base_model": meta["backbone"],
        "resolution": meta.get("resolution"),
        "schema": meta["schema"],
        "max_persons": meta["schema"]["max_persons"],
        "tokens_per_person": adapter["tokens_per_person"],
        "embed_dim": adapter["embed_dim"],
        "region_masks": adapter.get("region_masks", True),
        "region_expand": adapter.get("region_expand", 1.5),
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
        (staging / "README.md").write_text(_model_card(config))
    return output
