"""The per-person attribute record and its schema.

A *person record* is a plain mapping, as stored in a sidecar file or a dataset column::

    {"box": [x0, y0, x1, y1], "age": 34, "gender": "female", "yaw": 12.0, "pitch": -3.0, "roll": 1.5}

``box`` (the face) is always present and normalized to the image (0..1, ``x0 < x1``, ``y0 < y1``). ``body``
is optional: the person's whole extent (a box normalized the same way that contains the face box), recorded by
the mini world's generator and by ``annotate.py``'s person detector. A schema with a ``body`` section
(:class:`BodyExtent`) makes the extent a conditioning input and the region the anonymizers redraw; a record
without a body box then reaches as far as the section's margins around its face. Every other field is declared by
the :class:`AttributeSchema`, built from config, so new attributes (continuous or categorical) are a config
change. Identity is deliberately *not* a field: the adapter never sees it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BOX_KEY = "box"
BODY_KEY = "body"
# The sidecar rows' ``schema_version`` that annotation writes and the newest readers accept (2: records may carry
# ``body``); a row without one is version 1.
RECORD_SCHEMA_VERSION = 2


class InvalidRecordError(ValueError):
    """A person record does not match the schema; the message names the source and the field, ``reason`` is a
    short stable label for counting (``missing field``, ``out of range``, ...)."""

    def __init__(self, message: str, reason: str = "invalid person record") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ContinuousAttribute:
    """A real-valued attribute with a closed range; ``mirror`` flips its sign under a horizontal flip.

    Args:
        name: the record field.
        low: the lowest valid value.
        high: the highest valid value.
        mirror: negate the value under a horizontal flip (yaw, roll).
    """

    name: str
    low: float
    high: float
    mirror: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        if not self.low < self.high:
            raise ValueError(f"attribute '{self.name}': low ({self.low}) must be < high ({self.high})")
        if self.mirror and not math.isclose(self.low, -self.high):
            raise ValueError(
                f"attribute '{self.name}': mirror=true needs a range symmetric around 0, got [{self.low}, {self.high}]"
            )

    def normalize(self, value: float) -> float:
        """Map the declared range onto [0, 1].

        Args:
            value: a value inside ``[low, high]``.
        """
        return (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class CategoricalAttribute:
    """An attribute taking one of ``classes``; records may give the class name or its index.

    Args:
        name: the record field.
        classes: the class names, in the encoder's index order.
    """

    name: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"attribute '{self.name}': needs at least two distinct classes, got {self.classes}")

    def index(self, value: Any, where: str) -> int:
        """The class index of ``value`` (a class name or an index), or :class:`InvalidRecordError`.

        Args:
            value: what the record holds.
            where: the record's place, for the error.
        """
        if isinstance(value, str):
            if value not in self.classes:
                raise InvalidRecordError(
                    f"{where}: '{self.name}' is '{value}', expected one of {list(self.classes)}", "unknown class"
                )
            return self.classes.index(value)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(self.classes):
            return int(value)
        raise InvalidRecordError(
            f"{where}: '{self.name}' is {value!r}, expected a class name in {list(self.classes)} "
            f"or an index 0..{len(self.classes) - 1}",
            "unknown class",
        )


def _check_box(value: Any, name: str, where: str) -> tuple[float, float, float, float]:
    """A normalized ``[x0, y0, x1, y1]`` as floats, or :class:`InvalidRecordError` naming the field."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 4:
        raise InvalidRecordError(f"{where}: '{name}' must be 4 numbers [x0, y0, x1, y1], got {value!r}", "bad box")
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise InvalidRecordError(f"{where}: '{name}' must be 4 numbers, got {value!r}", "bad box") from err
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or not (x0 < x1 and y0 < y1):
        raise InvalidRecordError(
            f"{where}: '{name}' {value!r} must be normalized to [0, 1] with x0 < x1 and y0 < y1", "bad box"
        )
    return x0, y0, x1, y1


# Rounding slack of a body box around its face box (records are written with a few decimals).
_CONTAIN_SLACK = 1e-3


@dataclass(frozen=True)
class BodyExtent:
    """A schema's ``body`` section: persons reach beyond their face, and that extent is theirs (conditioning,
    regions). A record without a body box reaches ``from_face`` beyond its face box: margins ``(left, top, right,
    bottom)`` in face widths (left, right) and face heights (top, bottom), clipped to the image.

    Args:
        from_face: the margins around a face box of a record without ``body``.
    """

    from_face: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.from_face)
        if len(values) != 4 or not all(math.isfinite(v) and v >= 0.0 for v in values):
            raise ValueError(
                f"attribute schema: body.from_face must be 4 margins >= 0 (left, top, right, bottom, in face widths "
                f"and heights), got {list(self.from_face)}"
            )
        object.__setattr__(self, "from_face", values)

    def around(self, box: Sequence[float]) -> list[float]:
        """The extent of a person known only by its face box ``box`` (normalized), clipped to the image.

        Args:
            box: the face box.
        """
        x0, y0, x1, y1 = (float(v) for v in box)
        left, top, right, bottom = self.from_face
        w, h = x1 - x0, y1 - y0
        return [max(0.0, x0 - left * w), max(0.0, y0 - top * h), min(1.0, x1 + right * w), min(1.0, y1 + bottom * h)]


@dataclass(frozen=True)
class PersonArrays:
    """Fixed-size arrays for up to ``max_persons`` persons; rows past ``mask`` are zero padding.

    Args:
        boxes: ``[P, 4]`` float32, normalised face boxes ``x0, y0, x1, y1``.
        extents: ``[P, 4]`` float32, each person's extent: its body box, its face box grown by the schema's
            :class:`BodyExtent` where it has none, or its face box under a schema without ``body``.
        continuous: ``[P, C]`` float32, each attribute mapped to ``[0, 1]``.
        categorical: ``[P, K]`` int64 class indices.
        mask: ``[P]`` bool, true for real persons.
    """

    boxes: np.ndarray  # [P, 4] float32, normalized xyxy
    extents: np.ndarray  # [P, 4] float32, normalized xyxy
    continuous: np.ndarray  # [P, C] float32, each attribute normalized to [0, 1]
    categorical: np.ndarray  # [P, K] int64 class indices
    mask: np.ndarray  # [P] bool, True for real persons


@dataclass(frozen=True)
class AttributeSchema:
    """Which attributes describe a person, their ranges, and how many persons an image may hold.

    Args:
        max_persons: the most persons per image (the rest are dropped, largest kept).
        continuous: the real-valued attributes, in the encoder's input order.
        categorical: the categorical attributes, in the encoder's input order.
        body: persons reach beyond their face (:class:`BodyExtent`); ``None``: a person is its face box.
    """

    max_persons: int
    continuous: tuple[ContinuousAttribute, ...] = ()
    categorical: tuple[CategoricalAttribute, ...] = ()
    body: BodyExtent | None = None
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.max_persons < 1:
            raise ValueError(f"max_persons must be >= 1, got {self.max_persons}")
        names = tuple(a.name for a in self.continuous) + tuple(a.name for a in self.categorical)
        if len(set(names)) != len(names) or BOX_KEY in names or BODY_KEY in names:
            raise ValueError(f"attribute names must be unique and must not be '{BOX_KEY}' or '{BODY_KEY}': {names}")
        object.__setattr__(self, "names", names)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AttributeSchema:
        """Build from ``{max_persons, continuous: {name: {low, high, mirror}}, categorical: {name: [classes]},
        body: {from_face: [left, top, right, bottom]}}`` (the Hydra form; ``body`` optional) or the list form of
        :meth:`to_config`. Attribute order is the encoder's input order.

        Args:
            config: the schema config (either form).
        """
        unknown = set(config) - {"max_persons", "continuous", "categorical", "body"}
        if unknown:
            raise ValueError(f"attribute schema: unknown keys {sorted(unknown)}")

        def items(group: Any) -> list[tuple[str, Any]]:
            if isinstance(group, Mapping):
                return list(group.items())
            return [(entry["name"], {k: v for k, v in entry.items() if k != "name"}) for entry in group or []]

        continuous = tuple(ContinuousAttribute(name=k, **dict(v)) for k, v in items(config.get("continuous")))
        categorical = tuple(
            CategoricalAttribute(name=k, classes=tuple(v["classes"] if isinstance(v, Mapping) else v))
            for k, v in items(config.get("categorical"))
        )
        body_config = config.get("body")
        if body_config is not None and (not isinstance(body_config, Mapping) or set(body_config) != {"from_face"}):
            raise ValueError(
                f"attribute schema: body must be {{from_face: [left, top, right, bottom]}}, got {body_config}"
            )
        body = BodyExtent(tuple(body_config["from_face"])) if body_config is not None else None
        return cls(max_persons=int(config["max_persons"]), continuous=continuous, categorical=categorical, body=body)

    def to_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_config`, for checkpoints and exports. Lists keep the attribute order even
        through JSON writers that sort keys (diffusers' config files do)."""
        config: dict[str, Any] = {
            "max_persons": self.max_persons,
            "continuous": [{"name": a.name, "low": a.low, "high": a.high, "mirror": a.mirror} for a in self.continuous],
            "categorical": [{"name": a.name, "classes": list(a.classes)} for a in self.categorical],
        }
        if self.body is not None:  # absent, not null: a schema without one keeps the config (and cache keys) it had
            config["body"] = {"from_face": list(self.body.from_face)}
        return config

    @property
    def num_continuous(self) -> int:
        """How many continuous attributes a person has."""
        return len(self.continuous)

    @property
    def num_categorical(self) -> int:
        """How many categorical attributes a person has."""
        return len(self.categorical)

    def validate(self, person: Mapping[str, Any], where: str) -> None:
        """Raise :class:`InvalidRecordError` naming ``where`` and the field if ``person`` is not valid.

        Args:
            person: one person record.
            where: its place (``file:line``), for the error.
        """
        if not isinstance(person, Mapping):
            raise InvalidRecordError(
                f"{where}: a person record must be a mapping, got {type(person).__name__}", "not a record"
            )
        missing = [k for k in (BOX_KEY, *self.names) if k not in person or person[k] is None]
        if missing:
            raise InvalidRecordError(f"{where}: missing field(s) {missing}", "missing field")
        face = _check_box(person[BOX_KEY], BOX_KEY, where)
        if self.body is not None and person.get(BODY_KEY) is not None:  # a face-only schema ignores bodies
            body = _check_box(person[BODY_KEY], BODY_KEY, where)
            s = _CONTAIN_SLACK
            if not (
                body[0] <= face[0] + s and body[1] <= face[1] + s and body[2] >= face[2] - s and body[3] >= face[3] - s
            ):
                raise InvalidRecordError(
                    f"{where}: '{BODY_KEY}' {list(body)} must contain the face 'box' {list(face)} (a person's extent "
                    "includes its face: write their union)",
                    "body outside face",
                )
        for attr in self.continuous:
            value = person[attr.name]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise InvalidRecordError(f"{where}: '{attr.name}' must be a number, got {value!r}", "not a number")
            if not (math.isfinite(value) and attr.low <= value <= attr.high):
                reason = "not a finite number" if not math.isfinite(value) else "out of range"
                message = f"{where}: '{attr.name}' = {value} is outside [{attr.low}, {attr.high}]"
                raise InvalidRecordError(message, reason)
        for cat in self.categorical:
            cat.index(person[cat.name], where)

    def to_arrays(self, persons: Sequence[Mapping[str, Any]], where: str) -> PersonArrays:
        """Validate and pack persons into padded arrays; callers must already have cut to ``max_persons``.

        Args:
            persons: an image's person records.
            where: their place, for errors.
        """
        if len(persons) > self.max_persons:
            raise InvalidRecordError(f"{where}: {len(persons)} persons exceed max_persons={self.max_persons}")
        p = self.max_persons
        boxes = np.zeros((p, 4), np.float32)
        extents = np.zeros((p, 4), np.float32)
        continuous = np.zeros((p, self.num_continuous), np.float32)
        categorical = np.zeros((p, self.num_categorical), np.int64)
        mask = np.zeros((p,), bool)
        for i, person in enumerate(persons):
            self.validate(person, f"{where}, person {i}")
            boxes[i] = [float(v) for v in person[BOX_KEY]]
            extents[i] = self.extent(person)
            continuous[i] = [a.normalize(float(person[a.name])) for a in self.continuous]
            categorical[i] = [c.index(person[c.name], where) for c in self.categorical]
            mask[i] = True
        return PersonArrays(boxes=boxes, extents=extents, continuous=continuous, categorical=categorical, mask=mask)

    def extent(self, person: Mapping[str, Any]) -> list[float]:
        """A (valid) record's extent: its body box, its face box grown by ``body.from_face`` where it has none, or
        its face box under a schema without ``body``.

        Args:
            person: one person record.
        """
        face = [float(v) for v in person[BOX_KEY]]
        if self.body is None:
            return face
        if person.get(BODY_KEY) is not None:
            return [float(v) for v in person[BODY_KEY]]
        return self.body.around(face)

    def mirror(self, person: Mapping[str, Any]) -> dict[str, Any]:
        """The record as seen in the horizontally flipped image: box mirrored, ``mirror`` attributes negated.

        Args:
            person: one person record.
        """
        out = dict(person)
        for key in (BOX_KEY, BODY_KEY):
            if person.get(key) is not None:
                x0, y0, x1, y1 = (float(v) for v in person[key])
                out[key] = [1.0 - x1, y0, 1.0 - x0, y1]
        for attr in self.continuous:
            if attr.mirror:
                out[attr.name] = -float(person[attr.name])
        return out


def as_schema(schema: AttributeSchema | Mapping[str, Any]) -> AttributeSchema:
    """Accept a built schema or its config mapping (as Hydra passes it).

    Args:
        schema: a schema or its config.
    """
    return schema if isinstance(schema, AttributeSchema) else AttributeSchema.from_config(schema)


def keep_largest(persons: Sequence[Mapping[str, Any]], limit: int) -> list[Mapping[str, Any]]:
    """Keep the ``limit`` persons with the largest boxes, in their original order.

    Args:
        persons: an image's person records.
        limit: how many to keep.
    """
    if len(persons) <= limit:
        return list(persons)

    def area(p: Mapping[str, Any]) -> float:
        x0, y0, x1, y1 = (float(v) for v in p[BOX_KEY])
        return (x1 - x0) * (y1 - y0)

    ranked = sorted(range(len(persons)), key=lambda i: area(persons[i]), reverse=True)[:limit]
    return [persons[i] for i in sorted(ranked)]
