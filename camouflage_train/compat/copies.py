"""``# Copied from`` markers: code adapted from a library, checked against the installed library's source.

A marker sits on the line above the adapted definition::

    # Copied from <module>.<object>
    # (<library> <version>, source sha256 <16 hex digits>): <what differs>

It names the upstream object, the version read and the first 16 hex digits of the SHA-256 of its source (as
``inspect.getsource`` returns it). :func:`copied_from_problems` recomputes each hash; when upstream has changed, the
adapted code is to be read against the new source and the marker updated, so a library upgrade cannot change
what was copied without anyone noticing (``tests/test_compat.py`` runs it).
"""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from hydra.utils import get_object

MARKER = re.compile(
    r"^[ \t]*#\s*Copied from (?P<target>[\w.]+)\s*\n\s*#\s*\((?P<library>[\w-]+) (?P<version>[\w.]+), "
    r"source sha256 (?P<digest>[0-9a-f]{16})\)",
    re.MULTILINE,
)
PACKAGE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CopiedFrom:
    """One marker: where it is and what it records.

    Args:
        file: the file with the marker.
        line: the marker's first line.
        target: the upstream object's dotted name.
        library: the distribution it belongs to.
        version: the version read when copying.
        digest: the first 16 hex digits of the SHA-256 of its source then.
    """

    file: Path
    line: int
    target: str
    library: str
    version: str
    digest: str


def source_digest(target: str) -> str:
    """The first 16 hex digits of the SHA-256 of ``target``'s source.

    Args:
        target: a dotted name (``package.module.Class.method``).
    """
    return hashlib.sha256(inspect.getsource(get_object(target)).encode()).hexdigest()[:16]


def find_markers(root: Path = PACKAGE) -> list[CopiedFrom]:
    """Every ``# Copied from`` marker in the Python files under ``root``.

    Args:
        root: the folder to search.
    """
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        for match in MARKER.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(CopiedFrom(path, line, *match.group("target", "library", "version", "digest")))
    return found


def copied_from_problems(root: Path = PACKAGE) -> list[str]:
    """One line per marker under ``root`` whose upstream source no longer matches (or cannot be found).

    Args:
        root: the folder to search.
    """
    problems = []
    for marker in find_markers(root):
        where = f"{marker.file}:{marker.line}"
        try:
            digest = source_digest(marker.target)
        except (ImportError, AttributeError, OSError, TypeError) as error:
            problems.append(f"{where}: {marker.target} is not in the installed {marker.library} ({error})")
            continue
        if digest != marker.digest:
            problems.append(
                f"{where}: {marker.target} changed upstream ({marker.library} {version(marker.library)}, source "
                f"sha256 {digest}; the marker read {marker.version}, {marker.digest}): read the code below the "
                "marker against the new source, then update the marker's version and digest"
            )
    return problems
