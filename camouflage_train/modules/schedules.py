"""The optimizer + LR-schedule dict every LightningModule here returns from ``configure_optimizers``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.optim import Optimizer


def with_schedule(
    optimizer: Optimizer, spec: Mapping[str, Any] | None, total_steps: Callable[[], int]
) -> dict[str, Any]:
    """``spec``: ``{name, warmup_steps}`` for ``diffusers.optimization.get_scheduler`` (stepped every optimizer
    step), or ``None`` for a constant rate; ``total_steps`` is asked only when a schedule needs it (a module
    used without a Trainer has none).

    Args:
        optimizer: the optimizer.
        spec: ``{name, warmup_steps}`` or ``None``.
        total_steps: returns the run's optimizer steps.
    """
    if not spec:
        return {"optimizer": optimizer}
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(
        spec.get("name", "constant_with_warmup"),
        optimizer,
        num_warmup_steps=int(spec.get("warmup_steps", 0)),
        num_training_steps=int(total_steps()),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
