"""Validation gains: does the adapter use the persons, and their attributes, not only their places?

Each gain is a validation loss with some of the batch's conditioning moved elsewhere, minus the loss with its own,
at the same noise and timesteps (what to watch during a long run):

* ``conditioning_gain``: every image's persons replaced by the next image's. Positive means the adapter uses the
  persons (places and attributes).
* ``attribute_gain``: every person's attributes (not its box) passed on to the next person of the batch. Positive
  means it uses the attributes, not only the places.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from camouflage_train.data.dataset import PERSON_ARRAY_KEYS


def persons_of_the_next_image(batch: dict[str, Any]) -> dict[str, Any] | None:
    """``batch`` with every image's persons replaced by the next image's; ``None`` for a batch of one image.

    Args:
        batch: a collated training batch.
    """
    if batch["person_mask"].shape[0] < 2:
        return None
    return {**batch, **{k: batch[k].roll(1, dims=0) for k in PERSON_ARRAY_KEYS}}


def attributes_of_the_next_person(batch: dict[str, Any]) -> dict[str, Any] | None:
    """``batch`` with every real person's attributes (not its box) passed on to the next real person of the batch;
    ``None`` with fewer than two persons.

    Args:
        batch: a collated training batch.
    """
    real = batch["person_mask"].bool()
    if int(real.sum()) < 2:
        return None
    passed_on = dict(batch)
    for key in ("continuous", "categorical"):
        values = batch[key].clone()
        values[real] = batch[key][real].roll(1, dims=0)
        passed_on[key] = values
    return passed_on


def conditioning_gains(
    loss_of: Callable[[dict[str, Any]], torch.Tensor], batch: dict[str, Any], own_loss: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``{conditioning_gain, attribute_gain}``, each left out where the batch has nobody to swap with.

    Args:
        loss_of: the validation loss of a batch, at fixed noise and timesteps.
        batch: the validation batch.
        own_loss: ``loss_of(batch)``.
    """
    gains = {}
    for name, moved in (
        ("conditioning_gain", persons_of_the_next_image(batch)),
        ("attribute_gain", attributes_of_the_next_person(batch)),
    ):
        if moved is not None:
            gains[name] = loss_of(moved) - own_loss
    return gains
