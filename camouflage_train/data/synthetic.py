"""Procedurally drawn multi-person scenes with known attributes.

Used by the demo and the tests: no files, no downloads, and every attribute is visible in the pixels
(face size and place = box, hair colour = age, hair length = gender, eye/nose offset = yaw/pitch,
feature tilt = roll), so an adapter has something real to learn. Identity is what no attribute carries: the
colours of skin, hair and clothes and the shape of the face (eye spacing and size, mouth width, nose size), so a
face recogniser has something to recognise and an anonymizer something to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from camouflage_train.data.schema import BODY_KEY, AttributeSchema


def _rotate(
    points: list[tuple[float, float]], center: tuple[float, float], degrees: float
) -> list[tuple[float, float]]:
    a = math.radians(degrees)
    cx, cy = center
    cos, sin = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in points]


# Bumped whenever a seed draws different pixels or records; part of every synthetic cache key.
WORLD_VERSION = 3  # 3: records carry each person's body box

# Face box width as a fraction of the image width: the miniature world's scenes (19-32 px faces at 64², large
# enough for the shape of a face to survive the autoencoder; 10-22 px faces re-identify at half the rate).
FACE_SIZE = (0.3, 0.5)


def check_face_size(face_size: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` as floats, or a ValueError naming ``face_size``.

    Args:
        face_size: ``(low, high)`` fractions of the image width.
    """
    values = [float(v) for v in face_size]
    if len(values) != 2 or not 0.0 < values[0] <= values[1] < 1.0:
        raise ValueError(f"face_size: [low, high] with 0 < low <= high < 1 (fractions of the width), got {values}")
    return values[0], values[1]


# A drawn person's extent around its face box, in face widths and heights: clothes 0.9 face widths either side of
# the face's centre down to 2.5 face heights below the chin, hair from 0.1 face heights above the face.
_BODY_HALF_WIDTH, _HAIR_ABOVE, _CLOTHES_TOP, _CLOTHES_BELOW = 0.9, 0.1, 0.05, 2.5


def body_box(face: Sequence[float]) -> list[float]:
    """The box of everything :func:`draw_person` draws for a face box (hair, face, clothes), clipped to the image.

    Args:
        face: the normalized face box.
    """
    x0, y0, x1, y1 = (float(v) for v in face)
    cx, fw, fh = (x0 + x1) / 2, x1 - x0, y1 - y0
    return [
        max(0.0, cx - _BODY_HALF_WIDTH * fw),
        max(0.0, y0 - _HAIR_ABOVE * fh),
        min(1.0, cx + _BODY_HALF_WIDTH * fw),
        min(1.0, y1 + _CLOTHES_BELOW * fh),
    ]


def sample_person(
    rng: np.random.Generator,
    schema: AttributeSchema,
    occupied: list[list[float]],
    face_size: tuple[float, float] = FACE_SIZE,
) -> dict[str, Any]:
    """Draw a random face box (width uniform in ``face_size`` of the image width) that overlaps earlier ones
    little, plus attribute values inside the schema.

    Args:
        rng: the scene's random numbers.
        schema: the attribute schema (ranges, classes).
        occupied: the boxes drawn so far.
        face_size: the range of face widths, as fractions of the image width.
    """
    for _ in range(20):
        w = float(rng.uniform(*face_size))
        h = w * float(rng.uniform(1.1, 1.3))
        x0 = float(rng.uniform(0.0, 1.0 - w))
        y0 = float(rng.uniform(0.05, max(0.06, 0.75 - h)))
        box = [x0, y0, x0 + w, y0 + h]
        if all(box[2] <= o[0] or box[0] >= o[2] or box[3] <= o[1] or box[1] >= o[3] for o in occupied):
            break
    face = [round(v, 4) for v in box]
    person: dict[str, Any] = {"box": face, BODY_KEY: [round(v, 4) for v in body_box(face)]}
    for attr in schema.continuous:
        person[attr.name] = float(round(rng.uniform(attr.low, attr.high), 2))
    for cat in schema.categorical:
        person[cat.name] = cat.classes[int(rng.integers(len(cat.classes)))]
    return person


@dataclass(frozen=True)
class Appearance:
    """What no attribute carries: the person's identity in this world (and the hair colour, grey past 45).

    Colours, plus the face's shape as factors on the nominal feature sizes: eye spacing, eye radius, mouth
    width and nose size (1.0: the nominal face). The five keypoints stay nominal (pose only), so aligning a
    crop on them keeps these differences for a recogniser to see, as aligning a real face keeps its proportions.

    Args:
        hair: RGB.
        clothes: RGB.
        skin: RGB.
        eye_gap: factor on the nominal eye spacing.
        eye_size: factor on the nominal eye radius.
        mouth_width: factor on the nominal mouth width.
        nose_size: factor on the nominal nose size.
    """

    hair: tuple[int, int, int]
    clothes: tuple[int, int, int]
    skin: tuple[int, int, int]
    eye_gap: float = 1.0
    eye_size: float = 1.0
    mouth_width: float = 1.0
    nose_size: float = 1.0


# Ranges of the shape factors, wide enough to tell faces apart after the 64² autoencoder.
SHAPE_RANGES = {"eye_gap": (0.7, 1.3), "eye_size": (0.7, 1.5), "mouth_width": (0.5, 1.5), "nose_size": (0.6, 1.6)}


def sample_appearance(rng: np.random.Generator, age: float) -> Appearance:
    """A random identity: colours (grey hair past 45) and face-shape factors.

    Args:
        rng: the scene's random numbers.
        age: the person's age.
    """
    grey = int(np.clip(40 + age * 2.0, 40, 235))
    hair = (grey, grey, grey) if age > 45 else (int(rng.integers(40, 120)), int(rng.integers(20, 60)), 10)
    clothes = tuple(int(v) for v in rng.integers(30, 225, size=3))
    skin = tuple(int(v) for v in np.array([225, 185, 150]) * rng.uniform(0.55, 1.0))
    shape = {name: float(rng.uniform(low, high)) for name, (low, high) in SHAPE_RANGES.items()}
    return Appearance(hair, clothes, skin, **shape)  # type: ignore[arg-type]


def _scaled(points: list[tuple[float, float]], anchor: tuple[float, float], factor: float) -> list[tuple[float, float]]:
    ax, ay = anchor
    return [(ax + (x - ax) * factor, ay + (y - ay) * factor) for x, y in points]


def _midpoint(points: list[tuple[float, float]]) -> tuple[float, float]:
    return sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)


def _face_geometry(person: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """Pixel geometry of a face: box, centre and the (roll-rotated) eye centres, nose triangle and mouth line."""
    width, height = size
    x0, y0, x1, y1 = (
        person["box"][0] * width,
        person["box"][1] * height,
        person["box"][2] * width,
        person["box"][3] * height,
    )
    fw, fh = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # Features shift with yaw/pitch and tilt with roll.
    dx = float(person.get("yaw", 0.0)) / 90.0 * 0.25 * fw
    dy = float(person.get("pitch", 0.0)) / 90.0 * 0.25 * fh
    roll = float(person.get("roll", 0.0))
    eyes = _rotate([(cx + ex * fw + dx, cy - 0.05 * fh + dy) for ex in (-0.2, 0.2)], (cx, cy), roll)
    nose = _rotate(
        [
            (cx + 1.4 * dx, cy + 0.08 * fh + dy),
            (cx + 1.4 * dx - 0.05 * fw, cy + 0.2 * fh + dy),
            (cx + 1.4 * dx + 0.05 * fw, cy + 0.2 * fh + dy),
        ],
        (cx, cy),
        roll,
    )
    mouth = _rotate(
        [(cx - 0.15 * fw + dx, cy + 0.3 * fh + dy), (cx + 0.15 * fw + dx, cy + 0.3 * fh + dy)], (cx, cy), roll
    )
    return {"box": (x0, y0, x1, y1), "size": (fw, fh), "center": (cx, cy), "eyes": eyes, "nose": nose, "mouth": mouth}


def face_keypoints(person: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """insightface's five keypoints of a drawn face in pixels ``[5, 2]``: eyes, nose tip, mouth corners.

    Args:
        person: a drawn person's record.
        size: the image size ``(width, height)``.
    """
    g = _face_geometry(person, size)
    return np.array([g["eyes"][0], g["eyes"][1], g["nose"][0], g["mouth"][0], g["mouth"][1]], dtype=np.float32)


def draw_person(
    draw: ImageDraw.ImageDraw, person: dict[str, Any], size: tuple[int, int], appearance: Appearance
) -> None:
    """Draw one person (face, hair, clothes) from its record and appearance.

    Args:
        draw: the scene's drawing context.
        person: the person's record (box, attributes).
        size: the image size ``(width, height)``.
        appearance: its identity.
    """
    g = _face_geometry(person, size)
    x0, y0, x1, y1 = g["box"]
    fw, fh = g["size"]
    cx, cy = g["center"]
    long_hair = person.get("gender") in ("female", 0)
    # Body below the face, then hair, then the face on top.
    clothes = [
        cx - _BODY_HALF_WIDTH * fw,
        y1 + _CLOTHES_TOP * fh,
        cx + _BODY_HALF_WIDTH * fw,
        min(size[1], y1 + _CLOTHES_BELOW * fh),
    ]
    draw.rectangle(clothes, fill=appearance.clothes)
    hair_bottom = y1 + 0.4 * fh if long_hair else cy
    draw.rectangle([x0 - 0.08 * fw, y0 - _HAIR_ABOVE * fh, x1 + 0.08 * fw, hair_bottom], fill=appearance.hair)
    draw.ellipse([x0, y0 + 0.1 * fh, x1, y1], fill=appearance.skin)
    # The identity's shape: eyes spread about their midpoint, the nose grows from its tip, the mouth from its centre.
    eyes, mouth = g["eyes"], g["mouth"]
    eye_r = max(1.0, 0.07 * fw * appearance.eye_size)
    for px, py in _scaled(eyes, _midpoint(eyes), appearance.eye_gap):
        draw.ellipse([px - eye_r, py - eye_r, px + eye_r, py + eye_r], fill=(20, 20, 20))
    draw.polygon(_scaled(g["nose"], g["nose"][0], appearance.nose_size), fill=(150, 90, 70))
    mouth_px = max(1, int(0.04 * fh))
    draw.line(_scaled(mouth, _midpoint(mouth), appearance.mouth_width), fill=(120, 30, 30), width=mouth_px)


def draw_background(rng: np.random.Generator, resolution: int) -> Image.Image:
    """A vertical gradient between two random colours.

    Args:
        rng: the scene's random numbers.
        resolution: the image size in pixels.
    """
    top, bottom = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    ramp = np.linspace(0.0, 1.0, resolution, dtype=np.float32)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(background, (resolution, resolution, 3)).copy())


def draw_scene(
    seed: int,
    schema: AttributeSchema,
    resolution: int,
    min_persons: int = 1,
    max_persons: int | None = None,
    face_size: tuple[float, float] = FACE_SIZE,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Return an RGB scene and the person records drawn into it; the same seed gives the same scene.

    Args:
        seed: the scene's seed.
        schema: the attribute schema.
        resolution: the image size in pixels.
        min_persons: the fewest persons.
        max_persons: the most persons (default the schema's).
        face_size: the range of face widths, as fractions of the image width.
    """
    image, persons, _ = draw_scene_identities(seed, schema, resolution, min_persons, max_persons, face_size)
    return image, persons


def draw_scene_identities(
    seed: int,
    schema: AttributeSchema,
    resolution: int,
    min_persons: int = 1,
    max_persons: int | None = None,
    face_size: tuple[float, float] = FACE_SIZE,
) -> tuple[Image.Image, list[dict[str, Any]], list[Appearance]]:
    """:func:`draw_scene`, plus each person's identity (its :class:`Appearance`, in record order): the same
    pixels and records, so another view of any person can be drawn (:func:`draw_other_view`).

    Args:
        seed: the scene's seed.
        schema: the attribute schema.
        resolution: the image size in pixels.
        min_persons: the fewest persons.
        max_persons: the most persons (default the schema's).
        face_size: the range of face widths, as fractions of the image width.
    """
    face_size = check_face_size(face_size)
    rng = np.random.default_rng(seed)
    upper = schema.max_persons if max_persons is None else max_persons
    count = int(rng.integers(min_persons, upper + 1))
    image = draw_background(rng, resolution)
    draw = ImageDraw.Draw(image)
    persons: list[dict[str, Any]] = []
    for _ in range(count):
        persons.append(sample_person(rng, schema, [p["box"] for p in persons], face_size))
    appearances: list[Appearance | None] = [None] * count
    # Far persons (higher up) first, so nearer ones overlap them.
    for index in sorted(range(count), key=lambda i: persons[i]["box"][3]):
        appearances[index] = sample_appearance(rng, float(persons[index].get("age", 40.0)))
        draw_person(draw, persons[index], (resolution, resolution), appearances[index])
    return image, persons, [a for a in appearances if a is not None]


# The attributes a person keeps from one photo to the next (the rest, box and head pose, are drawn anew).
IDENTITY_ATTRIBUTES = ("age", "gender")


def draw_other_view(
    person: dict[str, Any],
    appearance: Appearance,
    rng: np.random.Generator,
    schema: AttributeSchema,
    resolution: int,
    face_size: tuple[float, float] = FACE_SIZE,
    max_strangers: int = 2,
) -> tuple[Image.Image, dict[str, Any]]:
    """The same identity in another photo: its appearance and identity-bound attributes (age, gender) at a new
    place, size and head pose, on a new background, with up to ``max_strangers`` other (new) people behind it.
    Returns the image and the person's record there.

    Args:
        person: the person's record in the first scene (its identity-bound attributes carry over).
        appearance: its identity.
        rng: this view's random numbers.
        schema: the attribute schema.
        resolution: the image size in pixels.
        face_size: the range of face widths, as fractions of the image width.
        max_strangers: the most other people in the view.
    """
    image = draw_background(rng, resolution)
    draw = ImageDraw.Draw(image)
    strangers: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(0, max_strangers + 1))):
        strangers.append(sample_person(rng, schema, [p["box"] for p in strangers], face_size))
    placed = sample_person(rng, schema, [p["box"] for p in strangers], face_size)
    placed.update({key: person[key] for key in IDENTITY_ATTRIBUTES if key in person})
    for stranger in strangers:
        draw_person(draw, stranger, image.size, sample_appearance(rng, float(stranger.get("age", 40.0))))
    draw_person(draw, placed, image.size, appearance)  # on top: the view shows the whole person
    return image, placed
