"""Packages that only some features need: imported when used, with the install command when missing.

The core install (``pip install -e .`` in a clone; the package is not published on PyPI) trains, exports and
evaluates without them; OpenCV
(weight-free control maps, head pose), insightface (face analysis) and controlnet_aux (real ControlNet
annotators) come with the extras named here.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def install_command(extra: str) -> str:
    """The command that installs ``extra`` (from the project's clone: the package is not published on PyPI).

    Args:
        extra: the package extra (``faces``, ``annotators``, ...).
    """
    return f"pip install -e '.[{extra}]' (in the camouflage-train clone)"


def optional_import(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` saying which extra brings it and what needs it.

    Args:
        module: the module to import.
        extra: the project's extra that installs it.
        needed_for: what needs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{needed_for} needs the '{module.split('.')[0]}' package: {install_command(extra)}") from err
