"""Who is who across photos: the *other view* protocol of the evaluation's attackers.

An attacker rarely holds the very photo that was anonymized; it holds *other* photos of the same person. For each
evaluated person, an :class:`OtherViews` gives its identity and a few other photos of it, with the person's face
box there, so the evaluation can ask whether an anonymized person is found among everyone's other photos.

- :class:`SyntheticOtherViews`: the mini world draws any evaluated person again, in a new scene (same appearance,
  age and gender; new place, size, head pose, background and strangers).
- :class:`SourceOtherViews`: real data, an identity sidecar (``identities.jsonl``: one ``{"image", "person",
  "identity"}`` row per recorded person) over a sample source; the other views of a person are the source's other
  images of the same identity. ``python -m camouflage_train.data.identities celebahq ...`` writes the sidecar of
  CelebA-HQ from the published CelebA-HQ-to-CelebA mapping and CelebA's identity file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from camouflage_train.data.schema import AttributeSchema, as_schema
from camouflage_train.data.synthetic import FACE_SIZE, check_face_size, draw_other_view, draw_scene_identities
from camouflage_train.errors import DataError

# The first word of the other views' random-stream key (np.random.default_rng([OTHER_VIEW_STREAM, scene + 1,
# person + 1, view + 1])): numpy pads a key with zeros, so every word after the first is at least 1 and the key can
# never equal a scene's one-word seed (tested).
OTHER_VIEW_STREAM = 0x07E5


@dataclass
class View:
    """One photo of a person.

    Args:
        image: the RGB photo.
        box: the person's face box there, xyxy in [0, 1].
        record: the person's record there (attributes), if known.
        name: the photo's name when it is one of the data's images (``None``: drawn for the protocol).
    """

    image: Image.Image
    box: Sequence[float]
    record: Mapping[str, Any] | None = None
    name: str | None = None


class OtherViews(Protocol):
    """Identity and other photos of an evaluated person (``name``: the evaluated image's name, ``person``: the
    person's index in its records)."""

    def identity(self, name: str, person: int) -> str | None:
        """The person's identity, or ``None`` when it is unknown.

        Args:
            name: the evaluated image's name.
            person: the person's index in the image's records.
        """

    def views(self, name: str, person: int) -> list[View]:
        """Other photos of the person (never the evaluated image itself); empty when there is none.

        Args:
            name: the evaluated image's name.
            person: the person's index in the image's records.
        """


def _index_of(name: str, what: str) -> int:
    stem = Path(name).stem
    if not stem.isdigit():
        raise DataError(f"{what}: image name {name!r} is not a row or scene number ('00000012.png')")
    return int(stem)


class SyntheticOtherViews:
    """The mini world's other views: the scene ``name`` is redrawn from its seed (the number in its name) with the
    source's settings, and person ``person`` is drawn again ``views_per_identity`` times elsewhere.

    Args:
        schema: the attribute schema of the evaluated scenes.
        resolution: their size in pixels.
        views_per_identity: other photos per person (the attackers' full gallery).
        min_persons: the evaluated source's ``min_persons``.
        face_size: the evaluated source's ``face_size``.
    """

    def __init__(
        self,
        schema: AttributeSchema | Mapping[str, Any],
        resolution: int,
        views_per_identity: int = 4,
        min_persons: int = 1,
        face_size: Sequence[float] = FACE_SIZE,
    ) -> None:
        if views_per_identity < 1:
            raise ValueError(f"views_per_identity: at least 1, got {views_per_identity}")
        self.schema, self.resolution = as_schema(schema), resolution
        self.views_per_identity, self.min_persons = views_per_identity, min_persons
        self.face_size = check_face_size(face_size)
        self._scene: tuple[int, list[dict[str, Any]], list[Any]] | None = None

    def _draw(self, name: str) -> tuple[list[dict[str, Any]], list[Any]]:
        seed = _index_of(name, "SyntheticOtherViews")
        if self._scene is None or self._scene[0] != seed:
            _, persons, appearances = draw_scene_identities(
                seed, self.schema, self.resolution, self.min_persons, face_size=self.face_size
            )
            self._scene = (seed, persons, appearances)
        return self._scene[1], self._scene[2]

    def identity(self, name: str, person: int) -> str | None:
        """``scene<seed>/person<index>``: each drawn person is its own identity.

        Args:
            name: the evaluated image's name.
            person: the person's index in the image's records.
        """
        persons, _ = self._draw(name)
        return f"scene{_index_of(name, 'SyntheticOtherViews')}/person{person}" if person < len(persons) else None

    def views(self, name: str, person: int) -> list[View]:
        """The person drawn again ``views_per_identity`` times, each view from its own random stream.

        Args:
            name: the evaluated image's name.
            person: the person's index in the image's records.
        """
        persons, appearances = self._draw(name)
        if person >= len(persons):
            return []
        scene = _index_of(name, "SyntheticOtherViews")
        out = []
        for view in range(self.views_per_identity):
            rng = np.random.default_rng(other_view_key(scene, person, view))
            image, record = draw_other_view(
                persons[person], appearances[person], rng, self.schema, self.resolution, self.face_size
            )
            out.append(View(image, record["box"], record))
        return out


def other_view_key(scene: int, person: int, view: int) -> list[int]:
    """The random-stream key of one other view (see :data:`OTHER_VIEW_STREAM`).

    Args:
        scene: the scene's seed.
        person: the person's index in the scene's records.
        view: the view's index.
    """
    return [OTHER_VIEW_STREAM, scene + 1, person + 1, view + 1]


def read_identities(path: str | Path) -> dict[tuple[str, int], str]:
    """An identity sidecar: ``(image name, person index) -> identity``; a clear error naming the file, the line
    and the fix for anything else.

    Args:
        path: the ``.jsonl`` file (one ``{"image": ..., "person": 0, "identity": ...}`` object per line;
            ``person`` defaults to 0).
    """
    path = Path(path)
    fix = (
        "write it with `python -m camouflage_train.data.identities celebahq ...` (CelebA-HQ) or one "
        '{"image": <name as in the person records>, "person": <index>, "identity": <id>} object per line'
    )
    if not path.is_file():
        raise DataError(f"identities file {path} does not exist: {fix}")
    table: dict[tuple[str, int], str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, person, identity = row["image"], int(row.get("person", 0)), row["identity"]
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path}:{number}: not an identity row ({type(error).__name__}: {error}); {fix}") from None
        if not isinstance(image, str) or identity is None or person < 0:
            raise DataError(f"{path}:{number}: 'image' must be a name, 'identity' set and 'person' >= 0; {fix}")
        table[(image, person)] = str(identity)
    if not table:
        raise DataError(f"identities file {path} has no rows: {fix}")
    return table


class SourceOtherViews:
    """Real data's other views: the other images of the same identity in ``source`` (an evaluated split, or a
    gallery of its own), at most ``views_per_identity`` of them in name order.

    Args:
        source: the sample source holding the photos (its names are the sidecar's ``image`` values).
        identities: the identity sidecar (see :func:`read_identities`).
        views_per_identity: the most other photos per person.
    """

    def __init__(self, source: Any, identities: str | Path, views_per_identity: int = 4) -> None:
        self.source, self.views_per_identity = source, views_per_identity
        self.table = read_identities(identities)
        name_of = getattr(source, "name_of", None)
        if name_of is None:
            raise DataError(f"{type(source).__name__}: other views need a source that names its samples (name_of)")
        names = {name_of(index): index for index in range(len(source))}
        self.index = names
        self.by_identity: dict[str, list[tuple[str, int]]] = {}
        for (image, person), identity in sorted(self.table.items()):
            if image in names:
                self.by_identity.setdefault(identity, []).append((image, person))

    def identity(self, name: str, person: int) -> str | None:
        """The sidecar's identity of the person (``None``: not in it).

        Args:
            name: the evaluated image's name.
            person: the person's index in the image's records.
        """
        return self.table.get((name, person))

    def views(self, name: str, person: int) -> list[View]:
        """The source's other images of the person's identity, at most ``views_per_identity``.

        Args:
            name: the evaluated image's name.
            person: the person's index in the image's records.
        """
        identity = self.identity(name, person)
        out: list[View] = []
        for image, other in self.by_identity.get(identity, []) if identity is not None else []:
            if image == name or len(out) >= self.views_per_identity:
                continue
            sample = self.source[self.index[image]]
            if sample.name != image:
                raise DataError(f"other views: sample {self.index[image]} is named {sample.name!r}, not {image!r}")
            if other < len(sample.persons):
                out.append(View(sample.image, sample.persons[other]["box"], sample.persons[other], name=image))
        return out


def celebahq_identities(
    mapping: str | Path, celeba_identities: str | Path, first_index: int = 0, count: int | None = None
) -> list[dict[str, Any]]:
    """CelebA-HQ's identity rows from the published files: ``CelebA-HQ-to-CelebA-mapping.txt`` (columns ``idx
    orig_idx orig_file``: CelebA-HQ image ``idx`` is CelebA's ``orig_file``) and CelebA's ``identity_CelebA.txt``
    (``<file> <identity>``), for a split whose row ``r`` is CelebA-HQ image ``first_index + r`` (named
    ``{r:08d}.png``, the split's row names). Which CelebA-HQ image a copy's row is cannot be read from the images:
    check your copy's order (docs/evaluation.md, "Identities").

    Args:
        mapping: ``CelebA-HQ-to-CelebA-mapping.txt``.
        celeba_identities: ``identity_CelebA.txt``.
        first_index: the CelebA-HQ index of the split's first row.
        count: the split's rows (``None``: up to the mapping's end).
    """
    identities = {}
    for line in Path(celeba_identities).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2:
            identities[parts[0]] = parts[1]
    rows = []
    for number, line in enumerate(Path(mapping).read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit():
            continue  # the header
        row = int(parts[0]) - first_index
        if row < 0 or (count is not None and row >= count):
            continue
        if parts[2] not in identities:
            raise DataError(f"{mapping}:{number}: {parts[2]} is not in {celeba_identities}")
        rows.append({"image": f"{row:08d}.png", "person": 0, "identity": identities[parts[2]]})
    if not rows:
        raise DataError(f"{mapping}: no 'idx orig_idx orig_file' rows")
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m camouflage_train.data.identities celebahq --mapping M --celeba-identities I [--first-index N]
    --out F``; returns the exit status.

    Args:
        argv: the command line (default ``sys.argv``).
    """
    parser = argparse.ArgumentParser(description="Write an identity sidecar for the other-view protocol.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    celebahq = sub.add_parser("celebahq", help="CelebA-HQ from the published CelebA mapping")
    celebahq.add_argument("--mapping", required=True, help="CelebA-HQ-to-CelebA-mapping.txt")
    celebahq.add_argument("--celeba-identities", required=True, help="CelebA's identity_CelebA.txt")
    celebahq.add_argument("--first-index", type=int, default=0, help="the CelebA-HQ index of the split's first row")
    celebahq.add_argument("--count", type=int, default=None, help="the split's rows (default: to the mapping's end)")
    celebahq.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    rows = celebahq_identities(args.mapping, args.celeba_identities, args.first_index, args.count)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} identity rows ({len({r['identity'] for r in rows})} identities) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
