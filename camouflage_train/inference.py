"""Use an exported Light adapter with stock diffusers, without Lightning or Hydra.

    pipe.load_ip_adapter(folder, subfolder="", weight_name="ip-adapter_camouflage.safetensors",
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(json.load(open(f"{folder}/config.json")).get("scale", 1.0))  # load_ip_adapter: 1.0
    encoder = load_attribute_encoder(folder)
    embeds, kwargs = person_inputs(encoder, [records_of_image_1, ...], height, width, unconditional_half=True)
    images = pipe(prompts, ip_adapter_image_embeds=embeds, cross_attention_kwargs=kwargs).images

With classifier-free guidance (``unconditional_half=True``, for ``guidance_scale > 1``) the negative half has no persons
(zero masks): the unconditional branch is the base model, as in training. Stock pipelines repeat
``ip_adapter_image_embeds`` for every prompt, so for several images per call every image's persons are passed as
shared slots that each image's masks switch on or off (exact; the adapter attention grows with the batch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from camouflage_train.data.schema import AttributeSchema
from camouflage_train.models.attribute_encoder import AttributeEncoder
from camouflage_train.models.conditioning import (
    PersonBatch,
    conditioning_inputs,
    shared_person_slots,
    with_unconditional_half,
)
from camouflage_train.models.ip_adapter import AdapterConfig


def load_attribute_encoder(folder: str | Path) -> AttributeEncoder:
    """The attribute encoder of an export folder, in eval mode.

    Args:
        folder: the export folder.
    """
    return AttributeEncoder.from_pretrained(Path(folder) / "attribute_encoder").eval()


@torch.no_grad()
def person_inputs(
    encoder: AttributeEncoder,
    records: Sequence[Sequence[Mapping[str, Any]]],
    height: int,
    width: int,
    unconditional_half: bool = True,
    vae_scale_factor: int = 8,
    region_expand: float | None = None,
    folder: str | Path | None = None,
    region_overlap: str = AdapterConfig.region_overlap,
    face_expand: float = AdapterConfig.face_expand,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """``ip_adapter_image_embeds`` and ``cross_attention_kwargs`` for a batch of images' person records.

    ``region_expand`` (or the export's ``config.json`` when ``folder`` is given) restricts each person to its
    extent grown that much (and, under a schema with ``body``, its face slot to its face box grown
    ``face_expand``); ``None`` without a folder means whole-image masks. ``vae_scale_factor``: the pipeline's
    (``pipe.vae_scale_factor``). Generate one image per record list (``num_images_per_prompt=1``).

    Args:
        encoder: the export's attribute encoder (:func:`load_attribute_encoder`).
        records: one list of person records per image.
        height: the image height in pixels.
        width: the image width in pixels.
        unconditional_half: for classifier-free guidance (``guidance_scale > 1``): prepend the negative half, with no
            persons.
        vae_scale_factor: the pipeline's ``pipe.vae_scale_factor``.
        region_expand: each person acts inside its box grown this much (``None``: the whole image).
        folder: an export folder whose ``config.json`` sets the regions (overrides ``region_expand`` and
            ``region_overlap``).
        region_overlap: ``sum`` or ``nearest`` (see ``AdapterConfig``).
        face_expand: under a schema with ``body``, each face slot acts in its face box grown this much.
        device: where the pipeline runs (``pipe.device``; ``None``: the CPU).
        dtype: the pipeline's dtype for the embeddings (``pipe.dtype``; ``None``: the encoder's).
    """
    if folder is not None:
        config = json.loads((Path(folder) / "config.json").read_text())
        region_expand = config["region_expand"] if config.get("region_masks", True) else None
        region_overlap = config.get("region_overlap", AdapterConfig.region_overlap)  # older exports: the default
        face_expand = config.get("face_expand", face_expand)
    persons = PersonBatch.from_records(AttributeSchema.from_config(encoder.config.schema), records)
    latent = (height // vae_scale_factor, width // vae_scale_factor)
    embeds, masks = conditioning_inputs(
        encoder, persons, latent, region_expand, region_overlap=region_overlap, face_expand=face_expand
    )
    if len(records) > 1:
        embeds, masks = shared_person_slots(embeds, masks)
    if unconditional_half:
        embeds, masks = with_unconditional_half(embeds, masks)
    return [embeds.to(device=device, dtype=dtype)], {"ip_adapter_masks": [masks.to(device)]}
