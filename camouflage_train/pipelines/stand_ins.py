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

from camouflage_train.errors import UserError
from camouflage_train.models.presets import stand_in_kind, stand_ins_in
from camouflage_train.pipelines.light import checkpoint_base_model

log = logging.getLogger(__name__)


def _checkpoints(node: Any, key: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        found: dict[str, str] = {}
        for name, value in node.items():
            found.update(_checkpoints(value, f"{key}.{name}" if key else str(name)))
        return found
    if key.split(".")[-1].endswith("checkpoint") and isinstance(node, str) and Path(node).is_file():
        return {key: node}
    return {}


def find_stand_ins(config: Mapping[str, Any]) -> dict[str, str]:
    """``{config key: what the stand-in is}`` for every stand-in the plain ``config`` names, a Light training
    checkpoint trained on one included.

    Args:
        config: the parts of a run's config that name models, as plain containers (``{"model": ..., "faces": ...}``).
    """
    found = stand_ins_in(dict(config))
    for key, path in _checkpoints(dict(config)).items():
        try:
            base = checkpoint_base_model(path)
        except UserError:  # not a Light checkpoint: whoever loads it says so
            continue
        kind = stand_in_kind(base)
        if kind is not None:
            found[key] = f"trained on {base}, {kind}"
    return found


def warn_stand_ins(found: Mapping[str, str]) -> None:
    """One warning per stand-in.

    Args:
        found: :func:`find_stand_ins`'s result.
    """
    for key, kind in found.items():
        log.warning("%s is a stand-in: %s", key, kind)
