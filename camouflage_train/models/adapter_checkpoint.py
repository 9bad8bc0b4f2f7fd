"""The Light training checkpoint's format: what it holds besides Lightning's own keys.

A Light checkpoint is a Lightning checkpoint whose ``state_dict`` holds only the trainable weights (the attribute
encoder ``encoder.*``, the projection ``unet.encoder_hid_proj.*`` and every ``to_k_ip``/``to_v_ip``), and whose
``camouflage`` entry describes the rest: the frozen base it was trained on, the attribute schema, the adapter's
size and the map from attention processors to IP-Adapter key ids. The training module writes it
(:func:`adapter_metadata`, :func:`trainable_only`); the pipelines and the export read it (:func:`read_metadata`),
without any training code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from camouflage_train.models.ip_adapter import AdapterConfig

FORMAT = 1
KEY = "camouflage"  # the checkpoint's entry for this format


class NotALightCheckpoint(ValueError):
    """A Lightning checkpoint without the Light adapter's description."""


def adapter_metadata(
    *,
    backbone_name: str,
    backbone_source: str | Path,
    schema: Mapping[str, Any],
    adapter: AdapterConfig,
    ip_adapter_keys: Iterable[tuple[str, int]],
    resolution: int | None,
    hyperparameters: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``camouflage`` entry of a Light checkpoint.

    Args:
        backbone_name: the frozen base as configured (hub id, folder or ``preset:<name>``).
        backbone_source: where it was loaded from.
        schema: the attribute schema's config.
        adapter: the adapter's size and region settings.
        ip_adapter_keys: ``(attention processor name, IP-Adapter key id)`` pairs, so that export needs no UNet.
        resolution: the training resolution (``None`` when unknown).
        hyperparameters: the module's hyperparameters, hashed into ``config_hash``.
    """
    encoded = json.dumps(dict(hyperparameters), sort_keys=True, default=str).encode()
    return {
        "format": FORMAT,
        "backbone": backbone_name,
        "backbone_source": str(backbone_source),
        "schema": dict(schema),
        "adapter": dataclasses.asdict(adapter),
        "ip_adapter_keys": dict(ip_adapter_keys),
        "resolution": resolution,
        "config_hash": hashlib.sha256(encoded).hexdigest()[:16],
    }


def trainable_only(state_dict: Mapping[str, torch.Tensor], trainable: Iterable[str]) -> dict[str, torch.Tensor]:
    """``state_dict`` without the frozen weights (frozen weights never enter a checkpoint).

    Args:
        state_dict: the module's full state dict.
        trainable: the names of its trainable parameters.
    """
    keep = set(trainable)
    return {k: v for k, v in state_dict.items() if k in keep}


def check_trainable_keys(expected: Iterable[str], found: Iterable[str]) -> None:
    """Refuse a checkpoint whose trainable weights are not exactly this adapter's, naming the first differences.

    Args:
        expected: the trainable parameter names of the adapter being loaded into.
        found: the checkpoint's ``state_dict`` keys.
    """
    expected, found = set(expected), set(found)
    if expected != found:
        raise ValueError(
            "checkpoint does not match this adapter: "
            f"missing {sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]} "
            "(was it trained with a different model.adapter or attributes config?)"
        )


def read_metadata(checkpoint: Mapping[str, Any], path: str | Path, key: str = "checkpoint") -> dict[str, Any]:
    """The ``camouflage`` entry of a Light checkpoint; :class:`NotALightCheckpoint` for any other checkpoint.

    Args:
        checkpoint: the loaded checkpoint.
        path: its file, for the error.
        key: the config key that names it, for the error.
    """
    meta = checkpoint.get(KEY)
    if not meta or "ip_adapter_keys" not in meta:
        raise NotALightCheckpoint(
            f"{key}: {path} is a training checkpoint, but not of a CAMOUFLaGE-Light run (a ControlNet run's, or "
            "an older format): pass <run>/checkpoints/last.ckpt of a train.py run with a Light model "
            "(experiment=demo, experiment=light_celebahq, ...)"
        )
    return meta
