"""Losses shared by the models trained around the frozen diffusion model."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_info_nce(logits: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE (CLIP's loss) of a ``[B, B]`` similarity matrix whose diagonal holds the matching pairs:
    the mean of the cross-entropies of each row over its columns and of each column over its rows.

    Args:
        logits: ``[B, B]`` pair similarities (already divided by the temperature); entries set very low are no
            negatives.
    """
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
