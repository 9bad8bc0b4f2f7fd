"""Person records -> what the adapted UNet receives: ``ip_adapter_image_embeds`` and region masks.

The one conditioning path. Training (:mod:`camouflage_train.modules.light_module`), validation sampling and the
Light pipeline (:mod:`camouflage_train.pipelines.light`) and plain-diffusers use of an export
(:func:`camouflage_train.inference.person_inputs`) all call :func:`conditioning_inputs`, so what a user feeds
a stock pipeline is exactly what the adapter was trained on.

Under classifier-free guidance the unconditional half has no persons (zero embeddings, all-zero masks): it is
the frozen base model, as in training's attribute dropout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from camouflage_train.data.schema import AttributeSchema
from camouflage_train.models.attribute_encoder import AttributeEncoder
from camouflage_train.models.ip_adapter import person_region_masks


@dataclass(frozen=True)
class PersonBatch:
    """Padded person arrays for a batch of images (see :class:`~camouflage_train.data.schema.PersonArrays`)."""

    boxes: torch.Tensor  # [B, P, 4]
    continuous: torch.Tensor  # [B, P, C]
    categorical: torch.Tensor  # [B, P, K]
    mask: torch.Tensor  # [B, P] bool

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any]) -> PersonBatch:
        """From a data-module batch (``boxes``, ``continuous``, ``categorical``, ``person_mask``)."""
        return cls(batch["boxes"], batch["continuous"], batch["categorical"], batch["person_mask"])

    @classmethod
    def from_records(cls, schema: AttributeSchema, records: Sequence[Sequence[Mapping[str, Any]]]) -> PersonBatch:
        """From one list of person records per image (validated against ``schema``)."""
        arrays = [schema.to_arrays(list(persons), f"image {i}") for i, persons in enumerate(records)]
        stack = lambda name: torch.from_numpy(np.stack([getattr(a, name) for a in arrays]))  # noqa: E731
        return cls(stack("boxes"), stack("continuous"), stack("categorical"), stack("mask"))

    def to(self, device: torch.device | str) -> PersonBatch:
        return PersonBatch(*(t.to(device) for t in (self.boxes, self.continuous, self.categorical, self.mask)))

    def __getitem__(self, index: slice) -> PersonBatch:
        return PersonBatch(self.boxes[index], self.continuous[index], self.categorical[index], self.mask[index])


def conditioning_inputs(
    encoder: AttributeEncoder,
    persons: PersonBatch,
    latent_size: tuple[int, int],
    region_expand: float | None,
    guidance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Person embeddings ``[B, P, E]`` and region masks ``[B, P, h, w]`` at latent resolution (``region_expand``:
    each person acts inside its box grown that much; ``None``: on the whole image). With ``guidance`` the
    unconditional half comes first, with no persons: ``[2B, ...]``, the order diffusers' pipelines expect."""
    embeds = encoder(persons.boxes, persons.continuous, persons.categorical)
    masks = person_region_masks(persons.boxes, persons.mask, latent_size, region_expand)
    if guidance:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
        masks = torch.cat([torch.zeros_like(masks), masks])
    return embeds, masks
