"""Build objects from config groups whose entries carry a ``_target_`` (callbacks, loggers, anonymizers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from camouflage_train.utils.config_checks import ConfigError, unknown_key_message


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Every entry of a group that has a ``_target_``, in order (entries without one are switched off).

    Args:
        group: a config group (``callbacks``, ``logger``, ...).
    """
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def instantiate_named(group: DictConfig, names: Sequence[str], key: str) -> dict[str, Any]:
    """``{name: object}`` for the chosen ``names`` of ``group``, in that order; ``key`` names the group in errors.

    Args:
        group: the group.
        names: the entries to build.
        key: the group's config key, for errors.
    """
    unknown = [name for name in names if name not in group]
    if unknown:
        raise ConfigError(f"{key}: {unknown_key_message(unknown[0], [str(k) for k in group], key)}")
    return {name: instantiate(group[name]) for name in names}
