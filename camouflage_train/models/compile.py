"""``torch.compile`` of the frozen UNet, whole or by region.

Regional compilation compiles each repeated block (the UNet's repeated blocks as diffusers marks them, i.e. the
transformer blocks, plus the ResNet blocks whose group norm + SiLU + convolution glue is what compilation fuses)
as its own module. Blocks of one kind share their code, so compilation time grows with the number of distinct
block *shapes*, not with the depth of the UNet, and parameter names stay unchanged (``nn.Module.compile`` works
in place), so checkpoints and the adapter's state dict are the same as eager.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import nn

from camouflage_train.compat.diffusers_internals import repeated_block_names

CompileMode = Literal["none", "blocks", "full"]
# Besides diffusers' own repeated blocks: the ResNet blocks (half of SD 1.5's UNet FLOPs, most of its glue).
EXTRA_REGIONS = ("ResnetBlock2D",)


def parse_compile_mode(value: bool | str | None) -> CompileMode:
    """``false``/``none`` -> eager, ``true``/``full`` -> the whole UNet at once, ``blocks`` -> by region.

    Args:
        value: the config value.
    """
    if value in (None, False, "none", "false"):
        return "none"
    if value in (True, "full", "true"):
        return "full"
    if value == "blocks":
        return "blocks"
    raise ValueError(f"model.compile_unet must be false, blocks or full (true), got {value!r}")


def compile_regions(unet: nn.Module, **compile_kwargs) -> int:
    """Compile every repeated block of ``unet`` in place; return how many were compiled.

    Args:
        unet: the UNet (keyword arguments go to ``torch.compile``).
    """
    names = {*repeated_block_names(unet), *EXTRA_REGIONS}
    blocks = [module for module in unet.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has none of the blocks {sorted(names)} to compile")
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def compile_unet(unet: nn.Module, which: bool | str | None, **compile_kwargs) -> CompileMode:
    """Compile ``which`` parts of ``unet`` in place (:func:`parse_compile_mode`); keyword arguments go to
    ``torch.compile`` (e.g. ``mode="reduce-overhead"``: CUDA graphs on a GPU), checked against its signature first.

    Args:
        unet: the UNet (keyword arguments go to ``torch.compile``).
        which: ``false``, ``blocks`` or ``full``.
    """
    parsed = parse_compile_mode(which)
    accepted = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(compile_kwargs) - accepted)
    if unknown:
        raise ValueError(f"model.compile_options: {unknown} are not torch.compile options; it takes {sorted(accepted)}")
    if compile_kwargs and parsed == "none":
        raise ValueError("model.compile_options is set but model.compile_unet is false: set it to blocks or full")
    if parsed == "full":
        unet.compile(**compile_kwargs)
    elif parsed == "blocks":
        compile_regions(unet, **compile_kwargs)
    return parsed
