"""Packages that only some features need: imported when used, with the install command when missing.

The core install (``pip install camouflage-train``) trains, exports and evaluates without them; OpenCV
(weight-free control maps, head pose), insightface (face analysis) and controlnet_aux (real ControlNet
annotators) come with the extras named here.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_import(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` saying which extra brings it and what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{needed_for} needs the '{module.split('.')[0]}' package: pip install 'camouflage-train[{extra}]'"
        ) from err
