"""The diffusers internals the project uses (diffusers 0.42; ``pyproject.toml`` pins the minor version)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def execution_device(pipe: Any) -> torch.device:
    """The device a diffusers pipeline runs its models on (``DiffusionPipeline._execution_device``: it also knows
    where CPU-offloaded models execute, which ``pipe.device`` does not).

    Args:
        pipe: a diffusers pipeline.
    """
    return pipe._execution_device


def load_ip_adapter_weights(unet: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Install one IP-Adapter state dict (``{"image_proj": ..., "ip_adapter": ...}``) into ``unet`` with diffusers'
    own loader (``UNet2DConditionModel._load_ip_adapter_weights``, what the pipelines' public ``load_ip_adapter``
    calls after reading the file), so the processors and projection are exactly the ones a stock pipeline builds.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        state_dict: the adapter in the original IP-Adapter layout.
    """
    loader = getattr(unet, "_load_ip_adapter_weights", None)
    if loader is None:
        raise RuntimeError(
            f"this diffusers version has no {type(unet).__name__}._load_ip_adapter_weights; camouflage-train is "
            "tested with diffusers 0.42 (pip install 'diffusers>=0.42,<0.43')"
        )
    loader([state_dict], low_cpu_mem_usage=False)


def repeated_block_names(unet: nn.Module) -> Sequence[str]:
    """The class names of the blocks diffusers marks as repeated in ``unet`` (``_repeated_blocks``: the units of its
    own regional compilation); empty for a model without them.

    Args:
        unet: a diffusers model.
    """
    return tuple(getattr(unet, "_repeated_blocks", ()))
