"""FSDP units for an adapter on a frozen backbone: every unit holds parameters of one dtype.

FSDP flattens the parameters of each wrapped unit into one tensor and refuses to mix dtypes in it. The frozen
backbone is bf16 (or fp16) while the adapter's trainable weights stay fp32, and the adapter sits *inside* the
backbone's blocks: its attention processors are submodules of diffusers' ``BasicTransformerBlock``, its image
projection of the UNet, its attribute encoder of the LightningModule. Wrapping only the UNet's blocks (the usual
policy) therefore puts fp32 and bf16 parameters in one unit and FSDP stops at setup.

:class:`UniformDtypeWrapPolicy` wraps the given block classes as usual and, in addition, every largest subtree
whose parameters are all trainable and of one dtype (each adapter processor, the image projection, the
attribute encoder), so that what remains in each block and in the root is the frozen backbone's dtype alone.
The plan is checked when FSDP first calls the policy (on the root): a unit left with two dtypes is one error
naming it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn


class MixedDtypeUnitError(ValueError):
    """A planned FSDP unit would still hold parameters of two dtypes."""


def _class(path: str | type) -> type:
    if isinstance(path, type):
        return path
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _kinds(module: nn.Module) -> set[tuple[torch.dtype, bool]]:
    return {(p.dtype, p.requires_grad) for p in module.parameters()}


def plan_units(root: nn.Module, block_classes: Sequence[type]) -> set[nn.Module]:
    """The modules to wrap as their own FSDP units (the root is wrapped by FSDP itself).

    Args:
        root: the module FSDP wraps (the LightningModule).
        block_classes: backbone block classes to wrap one by one (sharding granularity).
    """
    units: set[nn.Module] = set()

    def visit(module: nn.Module, parent_uniform: bool) -> None:
        kinds = _kinds(module)
        trainable_uniform = len(kinds) == 1 and next(iter(kinds))[1]
        if trainable_uniform and not parent_uniform and module is not root:
            units.add(module)  # the largest all-trainable, one-dtype subtree: the adapter's part here
        if isinstance(module, tuple(block_classes)) and module is not root:
            units.add(module)
        for child in module.children():
            visit(child, trainable_uniform)

    visit(root, False)
    names = {module: name for name, module in root.named_modules()}
    for unit in [root, *units]:
        holders = _remainder_holders(unit, units)
        if len(holders) > 1:
            counts = {dtype: sum(n for _, n in found) for dtype, found in holders.items()}
            odd = min(counts, key=counts.get)
            where = ", ".join(f"'{names[m] or type(m).__name__}'" for m, _ in holders[odd][:3])
            raise MixedDtypeUnitError(
                f"FSDP unit '{names[unit] or 'the root'}' ({type(unit).__name__}) would hold parameters of dtypes "
                f"{sorted(map(str, holders))}: {where} hold(s) {odd}. FSDP flattens one dtype per unit; wrap that "
                "module (add its class to the policy's block_classes) or load it in the backbone's dtype"
            )
    return units


def _remainder_holders(unit: nn.Module, units: set[nn.Module]) -> dict[torch.dtype, list[tuple[nn.Module, int]]]:
    """``{dtype: [(module, parameter count)]}`` of the parameters that stay in ``unit`` once its descendant units
    are wrapped."""
    found: dict[torch.dtype, list[tuple[nn.Module, int]]] = {}

    def collect(module: nn.Module) -> None:
        own: dict[torch.dtype, int] = {}
        for parameter in module.parameters(recurse=False):
            own[parameter.dtype] = own.get(parameter.dtype, 0) + parameter.numel()
        for dtype, count in own.items():
            found.setdefault(dtype, []).append((module, count))
        for child in module.children():
            if child not in units:
                collect(child)

    collect(unit)
    return found


def _remainder_dtypes(unit: nn.Module, units: set[nn.Module]) -> set[torch.dtype]:
    """Dtypes of the parameters that stay in ``unit`` once its descendant units are wrapped."""
    return set(_remainder_holders(unit, units))


class UniformDtypeWrapPolicy:
    """An FSDP ``auto_wrap_policy`` (the callable form) that wraps ``block_classes`` and the trainable subtrees.

    Args:
        block_classes: classes (or their dotted paths) to wrap one by one, e.g. diffusers'
            ``BasicTransformerBlock`` and ``ResnetBlock2D``.
    """

    def __init__(self, block_classes: Iterable[str | type]) -> None:
        self.block_classes = tuple(_class(c) for c in block_classes)
        self.units: set[nn.Module] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.units is None:  # FSDP's first call is on the root it wraps
            self.units = plan_units(module, self.block_classes)
        return True if recurse else module in self.units
