"""Which models of a run are stand-ins: random weights made for tests (``preset:tiny``, the tiny face pack, an
open_clip model without weights) or models built for the synthetic mini world (``preset:mini``, the mini face
pack). Entry points warn about each and write them into their outputs, so that an image or a score made by one is
never taken for the real thing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from camouflage_train.errors import UserError
from camouflage_train.models.presets import RANDOM_WEIGHTS, stand_in_kind
from camouflage_train.pipelines.light import checkpoint_base_model
from camouflage_train.utils.config_checks import walk_config

log = logging.getLogger(__name__)


def find_stand_ins(config: Mapping[str, Any]) -> dict[str, str]:
    """``{config key: what the stand-in is}`` for every stand-in the ``config`` names: a model id or ``_target_``
    (:func:`~camouflage_train.models.presets.stand_in_kind`), an open_clip model without ``pretrained`` weights, a
    Light training checkpoint trained on a stand-in base.

    Args:
        config: the parts of a run's config that name models (``{"model": cfg.model, "faces": cfg.faces}``).
    """
    found: dict[str, str] = {}
    for key, value in walk_config(dict(config)):
        name = key.rsplit(".", 1)[-1]
        if name == "base_model":  # which base a config is for, not a model it loads
            continue
        if isinstance(value, DictConfig | Mapping) and "model_name" in value and not value.get("pretrained", True):
            found[key] = RANDOM_WEIGHTS
        elif isinstance(value, str) and name.endswith("checkpoint") and Path(value).is_file():
            try:
                base = checkpoint_base_model(value)
            except UserError:  # not a Light checkpoint: whoever loads it says so
                continue
            if (kind := stand_in_kind(base)) is not None:
                found[key] = f"trained on {base}, {kind}"
        elif isinstance(value, str) and (kind := stand_in_kind(value)) is not None:
            found[key.removesuffix("._target_")] = kind
    return found


def warn_stand_ins(found: Mapping[str, str]) -> None:
    """One warning per stand-in.

    Args:
        found: :func:`find_stand_ins`'s result.
    """
    for key, kind in found.items():
        log.warning("%s is a stand-in: %s", key, kind)
