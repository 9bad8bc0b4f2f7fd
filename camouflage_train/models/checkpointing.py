"""Activation checkpointing of the frozen UNet: every block, or only the full-resolution ones.

Checkpointing trades memory for recomputed forward passes. The blocks at the latent's full resolution
(``down_blocks.0`` and the last up block) hold most of the activations for the fewest FLOPs per byte (attention
over every latent position, wide feature maps), so checkpointing only them (``high_res``) keeps much of the saving
at a fraction of the recomputation. diffusers' own switch (``enable_gradient_checkpointing``) sets up every block;
this turns it off again outside the chosen ones.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

CHECKPOINTING_CHOICES = (False, True, "high_res")


def high_resolution_blocks(unet: UNet2DConditionModel) -> tuple[str, ...]:
    """The UNet blocks at the latent's full resolution: the first down block and the last up block.

    Args:
        unet: the UNet.
    """
    return ("down_blocks.0", f"up_blocks.{len(unet.up_blocks) - 1}")


def enable_checkpointing(unet: UNet2DConditionModel, which: bool | str) -> None:
    """Checkpoint ``which`` blocks of ``unet`` (``False``: none, ``True``: all, ``"high_res"``: the full-resolution
    ones).

    Args:
        unet: the UNet.
        which: ``False``, ``True`` or ``"high_res"``.
    """
    if which not in CHECKPOINTING_CHOICES:
        raise ValueError(f"model.gradient_checkpointing must be one of {CHECKPOINTING_CHOICES}, got {which!r}")
    if which is False:
        return
    unet.enable_gradient_checkpointing()
    chosen = high_resolution_blocks(unet) if which == "high_res" else None
    for name, module in unet.named_modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = chosen is None or any(name == c or name.startswith(c + ".") for c in chosen)
