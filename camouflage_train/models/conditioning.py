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
from camouflage_train.models.ip_adapter import AdapterConfig, person_region_masks, split_overlapping_regions


@dataclass(frozen=True)
class PersonBatch:
    """Padded person arrays for a batch of images (see :class:`~camouflage_train.data.schema.PersonArrays`).

    Args:
        boxes: ``[B, P, 4]`` normalised face boxes ``x0, y0, x1, y1``.
        continuous: ``[B, P, C]`` attributes in ``[0, 1]``.
        categorical: ``[B, P, K]`` class indices.
        mask: ``[B, P]`` bool, true for real persons.
        extents: ``[B, P, 4]`` each person's extent (its body, :meth:`AttributeSchema.extent`): the region the
            anonymizers redraw and, under a schema with ``body``, a conditioning input; ``None``: not known (regions
            are then the face boxes, and an encoder with bodies refuses it).
    """

    boxes: torch.Tensor  # [B, P, 4]
    continuous: torch.Tensor  # [B, P, C]
    categorical: torch.Tensor  # [B, P, K]
    mask: torch.Tensor  # [B, P] bool
    extents: torch.Tensor | None = None  # [B, P, 4]; None: not known (regions fall back to the face boxes)

    def __post_init__(self) -> None:
        if self.extents is not None and self.extents.shape != self.boxes.shape:
            raise ValueError(f"extents {tuple(self.extents.shape)} must match boxes {tuple(self.boxes.shape)}")

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], mask: torch.Tensor | None = None) -> PersonBatch:
        """From a data-module batch (``boxes``, ``extents``, ``continuous``, ``categorical``, ``person_mask``).

        Args:
            batch: a collated training batch.
            mask: the persons to keep, instead of the batch's ``person_mask``.
        """
        mask = batch["person_mask"] if mask is None else mask
        return cls(batch["boxes"], batch["continuous"], batch["categorical"], mask, batch.get("extents"))

    @classmethod
    def from_records(cls, schema: AttributeSchema, records: Sequence[Sequence[Mapping[str, Any]]]) -> PersonBatch:
        """From one list of person records per image (validated against ``schema``).

        Args:
            schema: the attribute schema.
            records: one list of person records per image.
        """
        arrays = [schema.to_arrays(list(persons), f"image {i}") for i, persons in enumerate(records)]
        stack = lambda name: torch.from_numpy(np.stack([getattr(a, name) for a in arrays]))  # noqa: E731
        return cls(stack("boxes"), stack("continuous"), stack("categorical"), stack("mask"), stack("extents"))

    def to(self, device: torch.device | str) -> PersonBatch:
        """The same persons on ``device``.

        Args:
            device: the target device.
        """
        tensors = (self.boxes, self.continuous, self.categorical, self.mask, self.extents)
        return PersonBatch(*(None if t is None else t.to(device) for t in tensors))

    def __getitem__(self, index: slice) -> PersonBatch:
        tensors = (self.boxes, self.continuous, self.categorical, self.mask, self.extents)
        return PersonBatch(*(None if t is None else t[index] for t in tensors))

    def region_boxes(self) -> torch.Tensor:
        """The boxes the regions are made of: the extents, or the face boxes where those are not known."""
        return self.boxes if self.extents is None else self.extents

    def face_only(self) -> PersonBatch:
        """The same persons with their face boxes as their extents (for an adapter trained without bodies)."""
        return PersonBatch(self.boxes, self.continuous, self.categorical, self.mask, self.boxes)

    def region_masks(self, size: tuple[int, int], expand: float | None, cover: bool = False) -> torch.Tensor:
        """``[B, P, H, W]``: each person's region, its extent grown ``expand`` times (``None``: the whole image).

        Args:
            size: ``(H, W)`` of the masks.
            expand: the growth of each extent.
            cover: every cell the region touches (what is redrawn), not only those whose centre it holds.
        """
        return person_region_masks(self.region_boxes(), self.mask, size, expand, cover=cover)


def conditioning_inputs(
    encoder: AttributeEncoder,
    persons: PersonBatch,
    latent_size: tuple[int, int],
    region_expand: float | None,
    unconditional_half: bool = False,
    region_overlap: str = AdapterConfig.region_overlap,
    face_expand: float = AdapterConfig.face_expand,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Person embeddings ``[B, S, E]`` and region masks ``[B, S, h, w]`` at latent resolution, ``S`` slots: one per
    person, or, under a schema with ``body``, two per person in the order ``[extent, face]``: the first acts in the
    person's extent grown ``region_expand`` times, the second in its face box grown ``face_expand`` times, so the
    whole person is drawn and its face where its box says.

    Args:
        encoder: the attribute encoder.
        persons: the images' persons (padded slots masked off).
        latent_size: ``(h, w)`` of the latents.
        region_expand: each person acts inside its extent grown that much; ``None``: on the whole image.
        unconditional_half: for classifier-free guidance: an unconditional half with no persons comes first,
            ``[2B, ...]``, the order diffusers' pipelines expect.
        region_overlap: ``sum`` (overlapping regions both act) or ``nearest`` (each position to one person,
            :func:`~camouflage_train.models.ip_adapter.split_overlapping_regions`; extents and faces split apart).
        face_expand: the face slots' growth of the face box (under a schema with ``body``).
    """
    if not encoder.uses_extents:
        persons = persons.face_only()  # an adapter trained without bodies acts where it was trained: at faces
    embeds = encoder(persons.boxes, persons.continuous, persons.categorical, persons.extents)
    masks = persons.region_masks(latent_size, region_expand)
    if region_overlap == "nearest" and region_expand is not None:
        masks = split_overlapping_regions(masks, persons.region_boxes())
    if encoder.slots_per_person == 2:
        face_growth = face_expand if region_expand is not None else None
        faces = person_region_masks(persons.boxes, persons.mask, latent_size, face_growth)
        if region_overlap == "nearest" and region_expand is not None:
            faces = split_overlapping_regions(faces, persons.boxes)
        masks = torch.stack([masks, faces], dim=2).flatten(1, 2)  # [B, 2P, h, w]: extent, face, extent, face...
    return with_unconditional_half(embeds, masks) if unconditional_half else (embeds, masks)


def with_unconditional_half(embeds: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance's negative half first, with no persons (zero embeddings and masks).

    Args:
        embeds: person embeddings ``[B, P, E]``.
        masks: region masks ``[B, P, h, w]``.
    """
    return torch.cat([torch.zeros_like(embeds), embeds]), torch.cat([torch.zeros_like(masks), masks])


def shared_person_slots(embeds: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image persons ``[B, P, E]`` / ``[B, P, h, w]`` as one shared row ``[1, B*P, E]`` with masks
    ``[B, B*P, h, w]`` in which image ``b`` switches on only its own slots ``b*P .. b*P+P-1``.

    For stock pipelines, which repeat ``ip_adapter_image_embeds`` for every prompt (they expect one image's
    embedding shared by all prompts): each image then attends to every image's persons, and the masks zero all
    but its own, so the result is exact, at ``B`` times the adapter attention.

    Args:
        embeds: person embeddings ``[B, P, E]``.
        masks: region masks ``[B, P, h, w]``.
    """
    batch, slots = embeds.shape[:2]
    spread = masks.new_zeros(batch, batch * slots, *masks.shape[2:])
    for b in range(batch):
        spread[b, b * slots : (b + 1) * slots] = masks[b]
    return embeds.reshape(1, batch * slots, -1), spread
