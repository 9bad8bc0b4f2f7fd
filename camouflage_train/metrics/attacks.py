"""Re-identification attackers beyond the face recogniser, and the arithmetic every attacker shares.

An attacker reads each anonymized person (the *probe*) and ranks a gallery of identities; it re-identifies the person
when its own identity ranks first. What an attacker reads:

- ``face:<recogniser>``: the frozen face recogniser on the face found at the person's box (a person whose face is
  not found in the output, or in the gallery photo, counts as a miss; ``rank1_matched`` leaves those persons out);
- ``appearance``: colour statistics of the person's extent (hair, body, what is around it) in the photo with every
  known face painted over (:func:`hide_faces`): an attacker that needs no training and reads **no face pixel**;
- ``context``: a frozen image encoder on the person's extent and its surroundings (open_clip on real photographs,
  the miniature world's trained person encoder in the mini world); ``context_no_face``: the same encoder on the same
  crop of the photo with every known face painted over (no face pixel read);
- ``adaptive``: a re-identifier trained on the anonymizer's own outputs
  (:mod:`camouflage_train.modules.reid_attacker`): how much to trust each of the above, starting at ``context``.

Protocols: ``same_image`` (the gallery is the original photo of each person) and ``other_view`` (the gallery is other
photos of each person, :mod:`camouflage_train.data.identities`). An identity's gallery template is the mean of its
references' unit embeddings (``full``: every other view; ``few`` and ``single``: the first ones).

The ``floor`` is the rank-1 of an attacker that knows only the attributes the anonymizer promises to keep that a photo
shows of an identity (age and gender, read by the face pack), so a reader sees how much leaks beyond the promise.

Every measure is over **all** evaluated persons; rank-1 counts a tie among the top identities as a fraction (a random
pick among them), so an attacker that sees nothing scores the chance level 1/identities. A gallery identity the
attacker could not read at all (a face recogniser that found no face in any of its photos) does not compete, which
errs towards more re-identification, the same for every row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# The person's extent around its face box, in face widths (left, right) and face heights (top, bottom): hair above,
# shoulders to the sides, the body below. Crops reach outside the image as black.
DEFAULT_EXTENT = (0.6, 0.3, 0.6, 2.6)
# Crop pixels masked around the face box by the appearance attacker (the resize's reach).
FACE_MARGIN = 1.5
# False-accept rates at which verification is reported (thresholds calibrated on unanonymized pairs).
FALSE_ACCEPT_RATES = (0.01, 0.001)


def extent_box(face_box: Sequence[float], extent: Sequence[float] = DEFAULT_EXTENT) -> tuple[float, ...]:
    """The person's extent (xyxy, same units as ``face_box``) around its face box.

    Args:
        face_box: the face box, xyxy.
        extent: (left, top, right, bottom) margins in face widths / heights.
    """
    x0, y0, x1, y1 = (float(v) for v in face_box)
    w, h = x1 - x0, y1 - y0
    left, top, right, bottom = (float(v) for v in extent)
    return (x0 - left * w, y0 - top * h, x1 + right * w, y1 + bottom * h)


def person_crop(
    image: Image.Image, face_box: Sequence[float], size: int, extent: Sequence[float] = DEFAULT_EXTENT
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The person's extent cut from ``image`` and resized to ``size`` x ``size``, and the face box inside the crop
    (xyxy in [0, 1] of the crop).

    Args:
        image: the photo.
        face_box: the person's face box, xyxy in [0, 1] of the photo.
        size: the crop's side in pixels.
        extent: (left, top, right, bottom) margins in face widths / heights.
    """
    width, height = image.size
    face = [face_box[0] * width, face_box[1] * height, face_box[2] * width, face_box[3] * height]
    ex0, ey0, ex1, ey1 = extent_box(face, extent)
    crop = image.convert("RGB").crop((round(ex0), round(ey0), round(ex1), round(ey1)))
    span_x, span_y = max(ex1 - ex0, 1e-6), max(ey1 - ey0, 1e-6)
    inner = ((face[0] - ex0) / span_x, (face[1] - ey0) / span_y, (face[2] - ex0) / span_x, (face[3] - ey0) / span_y)
    return crop.resize((size, size), Image.BILINEAR), inner


def face_hidden(size: tuple[int, int], face: Sequence[float]) -> np.ndarray:
    """``[H, W]`` bool: the crop pixels a face box touches, grown by the resize's reach (a crop pixel mixes the photo's
    pixels up to about one crop pixel away), so no pixel the face contributed to is outside it.

    Args:
        size: the crop's ``(width, height)``.
        face: the face box inside it, xyxy in [0, 1].
    """
    size_x, size_y = size
    hidden = np.zeros((size_y, size_x), dtype=bool)
    x0, x1 = int(np.floor(face[0] * size_x - FACE_MARGIN)), int(np.ceil(face[2] * size_x + FACE_MARGIN))
    y0, y1 = int(np.floor(face[1] * size_y - FACE_MARGIN)), int(np.ceil(face[3] * size_y + FACE_MARGIN))
    hidden[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return hidden


def hide_faces(image: Image.Image, faces: np.ndarray) -> Image.Image:
    """The photo with every face box painted mid-grey, each grown to whole pixels and by one more: a crop of it,
    resized to any size, holds no face pixel (of the faces named in ``faces``) for any attacker to read.

    Args:
        image: the photo.
        faces: ``[F, 4]`` face boxes in pixels (xyxy): the persons' and every face a detector found.
    """
    pixels = np.array(image.convert("RGB"))
    height, width = pixels.shape[:2]
    for x0, y0, x1, y1 in np.asarray(faces, dtype=np.float64).reshape(-1, 4):
        top, bottom = max(int(np.floor(y0)) - 1, 0), min(int(np.ceil(y1)) + 1, height)
        left, right = max(int(np.floor(x0)) - 1, 0), min(int(np.ceil(x1)) + 1, width)
        pixels[top:bottom, left:right] = 128
    return Image.fromarray(pixels)


def appearance_features(crop: Image.Image, face: Sequence[float], bins: int = 4) -> np.ndarray:
    """Colour histograms (``bins`` per channel) of the crop's upper and lower halves without the face region
    (:func:`face_hidden`), as one unit vector of square-rooted frequencies (cosine = Bhattacharyya coefficient). Cut
    from a photo whose faces are hidden (:func:`hide_faces`), it reads no face pixel.

    Args:
        crop: a :func:`person_crop` (of a :func:`hide_faces` photo, for an attacker that reads no face pixel).
        face: the face box inside it, xyxy in [0, 1].
        bins: histogram bins per colour channel.
    """
    pixels = np.asarray(crop.convert("RGB"), dtype=np.int64)
    size_y = pixels.shape[0]
    keep = ~face_hidden(crop.size, face)
    codes = (pixels * bins // 256) @ np.array([bins * bins, bins, 1])
    parts = []
    for rows in (slice(0, size_y // 2), slice(size_y // 2, size_y)):
        counts = np.bincount(codes[rows][keep[rows]], minlength=bins**3).astype(np.float64)
        parts.append(np.sqrt(counts / max(counts.sum(), 1.0)))
    vector = np.concatenate(parts)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


class ContextEncoder:
    """A frozen image encoder on person crops -> unit embeddings ``[N, D]`` (numpy).

    Args:
        model: an open_clip scorer (anything with ``image_features(list of PIL images)``), or a module taking uint8
            images ``[B, 3, H, W]`` (the miniature world's person encoder).
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def to(self, device: torch.device | str) -> ContextEncoder:
        """The encoder on ``device`` (a module's weights move; a scorer keeps its own placement).

        Args:
            device: the device.
        """
        if isinstance(self.model, nn.Module):
            self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, crops: Sequence[Image.Image]) -> np.ndarray:
        if not crops:
            return np.zeros((0, 0), dtype=np.float32)
        if hasattr(self.model, "image_features"):
            features = self.model.image_features(list(crops))
        else:
            device = next(self.model.parameters()).device
            batch = torch.stack([torch.from_numpy(np.asarray(c.convert("RGB")).copy()).permute(2, 0, 1) for c in crops])
            features = self.model(batch.to(device))
        return F.normalize(features.float(), dim=-1).cpu().numpy()


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero).

    Args:
        vectors: ``[N, D]``.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def templates(
    embeddings: np.ndarray, identities: Sequence[str], references: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """One unit template per identity: the mean of its first ``references`` unit embeddings (all when ``None``),
    identities in first-seen order.

    Args:
        embeddings: the gallery's embeddings ``[M, D]`` (rows of NaN are references not seen: skipped).
        identities: each row's identity.
        references: how many references per identity (``None``: all).
    """
    order: dict[str, list[int]] = {}
    for index, identity in enumerate(identities):
        if np.all(np.isfinite(embeddings[index])):
            order.setdefault(identity, []).append(index)
    names = list(order)
    if not names:
        return np.zeros((0, embeddings.shape[1] if embeddings.ndim == 2 else 0)), []
    rows = [unit(embeddings[order[n][:references]]).mean(axis=0) for n in names]
    return unit(np.stack(rows)), names


def rank1_hits(scores: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Per probe, 1 when its own identity (column ``own``) scores highest, ``1/k`` when it ties with ``k - 1``
    others there, 0 otherwise (also when ``own`` is -1: its identity is not in the gallery).

    Args:
        scores: ``[N, G]`` probe-to-identity scores (higher = more alike; NaN = no score).
        own: ``[N]`` each probe's identity column, -1 when absent.
    """
    hits = np.zeros(len(own))
    for i, column in enumerate(own):
        row = np.where(np.isfinite(scores[i]), scores[i], -np.inf)
        if column < 0 or not np.isfinite(row[column]):
            continue
        best = row.max()
        if row[column] >= best:
            hits[i] = 1.0 / float(np.sum(row >= best))
    return hits


def impostor_threshold(scores: np.ndarray, own: np.ndarray, far: float) -> float:
    """The threshold a score must *exceed* to be accepted: at most ``far`` of impostor pairs (a probe and another
    identity) exceed it (the ``floor(far * n) + 1``-th highest impostor score).

    Args:
        scores: ``[N, G]`` scores of unanonymized probes against the identities.
        own: ``[N]`` each probe's identity column (-1: none).
        far: the false-accept rate.
    """
    impostor = np.ones_like(scores, dtype=bool)
    valid = own >= 0
    impostor[np.flatnonzero(valid), own[valid]] = False
    values = np.sort(scores[impostor & np.isfinite(scores)])[::-1]
    if not values.size:
        return float("nan")
    allowed = int(np.floor(far * values.size))
    return float(values[allowed]) if allowed < values.size else -np.inf


def genuine_scores(scores: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Each probe's score with its own identity (NaN when it has none).

    Args:
        scores: ``[N, G]`` probe-to-identity scores.
        own: ``[N]`` own identity columns (-1: none).
    """
    out = np.full(len(own), np.nan)
    valid = own >= 0
    out[valid] = scores[np.flatnonzero(valid), own[valid]]
    return out


def attribute_scores(
    probe: np.ndarray, gallery: np.ndarray, gallery_identities: Sequence[str], age_scale: float = 100.0
) -> tuple[np.ndarray, list[str]]:
    """Scores of an attacker that reads only age and gender: a gender mismatch ranks below any match, then the
    closer age ranks higher; an identity scores its best reference; a reference or probe without a face read
    (NaN) gives no score.

    Args:
        probe: ``[N, 2]`` (age, gender class) of each probe.
        gallery: ``[M, 2]`` (age, gender class) read in each gallery photo.
        gallery_identities: each gallery row's identity.
        age_scale: ages are compared in units of it (any value above the age range keeps gender first).
    """
    names = list(dict.fromkeys(gallery_identities))
    column = {name: i for i, name in enumerate(names)}
    scores = np.full((len(probe), len(names)), -np.inf)
    for m, identity in enumerate(gallery_identities):
        age_gap = np.abs(probe[:, 0] - gallery[m, 0]) / age_scale
        score = -age_gap - (probe[:, 1] != gallery[m, 1]).astype(np.float64)
        score = np.where(np.isfinite(score), score, -np.inf)
        scores[:, column[identity]] = np.maximum(scores[:, column[identity]], score)
    return np.where(np.isinf(scores), np.nan, scores), names


def own_columns(probe_identities: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Each probe's identity column among ``names`` (-1 when absent).

    Args:
        probe_identities: the probes' identities.
        names: the gallery identities in column order.
    """
    column = {name: i for i, name in enumerate(names)}
    return np.array([column.get(identity, -1) for identity in probe_identities], dtype=np.int64)


def image_bootstrap_se(values: np.ndarray, images: Sequence[str], resamples: int = 1000, seed: int = 0) -> float:
    """Standard error of the mean of per-person ``values`` when the evaluated *images* are resampled (the persons
    of one image stay together); NaN with fewer than two images.

    Args:
        values: one value per person.
        images: each person's image.
        resamples: bootstrap draws.
        seed: their seed.
    """
    names = sorted(set(images))
    if len(names) < 2:
        return float("nan")
    index = {name: i for i, name in enumerate(names)}
    sums, counts = np.zeros(len(names)), np.zeros(len(names))
    for value, image in zip(values, images, strict=True):
        sums[index[image]] += value
        counts[index[image]] += 1
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=resamples).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (draws @ sums) / (draws @ counts)
    return float(np.nanstd(means, ddof=1))


def summarize(
    hits: np.ndarray, images: Sequence[str], genuine: np.ndarray | None = None,
    thresholds: Mapping[float, float] | None = None, seed: int = 0,
) -> dict[str, float]:  # fmt: skip
    """``rank1`` (mean of ``hits``), its image-bootstrap ``rank1_se``, ``n``, and per false-accept rate the share of
    genuine scores above its threshold (``tar@far=<rate>``; a probe without a score is not accepted).

    Args:
        hits: per-person rank-1 hits (:func:`rank1_hits`).
        images: each person's image.
        genuine: per-person genuine scores (:func:`genuine_scores`).
        thresholds: false-accept rate -> threshold (:func:`impostor_threshold`).
        seed: the bootstrap's seed.
    """
    out = {
        "rank1": float(np.mean(hits)) if len(hits) else float("nan"),
        "rank1_se": image_bootstrap_se(hits, images, seed=seed),
        "n": float(len(hits)),
    }
    for far, threshold in (thresholds or {}).items():
        accepted = np.nan_to_num(genuine, nan=-np.inf) > threshold if genuine is not None else np.zeros(0)
        out[f"tar@far={far:g}"] = float(np.mean(accepted)) if len(accepted) else float("nan")
    return out
