"""Every evaluation row measured against every attacker, under both protocols (see
:mod:`camouflage_train.metrics.attacks` for what each attacker reads, and docs/evaluation.md for the threat models).

:class:`PrivacyAttacks` collects, image by image, what the attackers read of each evaluated person: in the original
photo and its other views once, in every row's output; :meth:`PrivacyAttacks.results` then ranks, trains the
adaptive attackers and returns one set of ``attack/...`` measures per row, with the attribute floor and the
worst-case attacker of each protocol. The records of all processes are gathered first, so a multi-GPU evaluation gives
the one-process numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pickle
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from camouflage_train.data.identities import OtherViews
from camouflage_train.metrics.attacks import (
    DEFAULT_EXTENT,
    FALSE_ACCEPT_RATES,
    ContextEncoder,
    appearance_features,
    attribute_scores,
    genuine_scores,
    hide_faces,
    impostor_threshold,
    own_columns,
    person_crop,
    rank1_hits,
    summarize,
    templates,
    unit,
)
from camouflage_train.metrics.faces import FaceSet
from camouflage_train.metrics.reid import match_faces
from camouflage_train.modules.reid_attacker import AdaptiveAttackerConfig, identity_folds, train_attacker

log = logging.getLogger(__name__)

PROTOCOLS = ("same_image", "other_view")
READINGS_VERSION = 1
FLOOR, WORST = "floor", "worst"


@dataclass
class _Reading:
    """What the attackers read of one person in one photo: feature name -> unit vector (``None``: no face found for
    a face recogniser), and the (age, gender) the face pack read (NaN: no face found)."""

    features: dict[str, np.ndarray | None]
    attributes: np.ndarray
    photo: str | None = None  # the photo's name when it is one of the data's images (an other view of real data)


@dataclass
class _Person:
    image: str
    person: int
    identity: str
    original: _Reading
    views: list[_Reading] = field(default_factory=list)
    outputs: dict[str, _Reading] = field(default_factory=dict)


class PrivacyAttacks:
    """Collects the attackers' readings during an evaluation and computes their results.

    Args:
        context: the frozen context encoder's model (see :class:`~camouflage_train.metrics.attacks.ContextEncoder`);
            ``None`` leaves the context and adaptive attackers out.
        other_views: other photos of each evaluated person (``None``: the same-image protocol only).
        crop_size: the side of the person crops the context encoder reads.
        extent: the person's extent around its face box (left, top, right, bottom in face widths / heights).
        adaptive: the adaptive attacker's training (``None``: no adaptive attacker; it needs ``context``).
        references: gallery sizes reported for the adaptive attacker besides the full gallery, by name
            (``{"single": 1, "few": 2}``).
        seed: folds, initialisations and bootstrap derive from it.
    """

    def __init__(
        self,
        context: Any = None,
        other_views: OtherViews | None = None,
        crop_size: int = 32,
        extent: Sequence[float] = DEFAULT_EXTENT,
        adaptive: AdaptiveAttackerConfig | Mapping[str, Any] | None = None,
        references: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.context = ContextEncoder(context) if context is not None else None
        self.other_views, self.crop_size, self.extent = other_views, crop_size, tuple(extent)
        if isinstance(adaptive, Mapping):
            adaptive = AdaptiveAttackerConfig(
                **{**adaptive, **({"parts": tuple(adaptive["parts"])} if "parts" in adaptive else {})}
            )
        if adaptive is not None and any(part.startswith("face:") for part in adaptive.parts):
            raise ValueError(
                f"attackers.adaptive.parts={list(adaptive.parts)}: a face recogniser reads nothing where no face is "
                "found, and an unread part cannot be weighed: use parts every person has (context, context_no_face, "
                "appearance)"
            )
        self.adaptive = adaptive
        self.references = dict(references if references is not None else {"single": 1, "few": 2})
        self.seed = seed
        self.persons: dict[tuple[str, int], _Person] = {}
        # (row, protocol, image, person) -> attacker -> rank-1 hit: what each attacker did to each person.
        self.records: dict[tuple[str, str, str, int], dict[str, float]] = {}

    def to(self, device: torch.device | str) -> PrivacyAttacks:
        """The context encoder on ``device``.

        Args:
            device: the evaluation's device.
        """
        if self.context is not None:
            self.context.to(device)
        return self

    def reset(self) -> None:
        """Forget every reading (a new evaluation starts)."""
        self.persons, self.records = {}, {}

    def _record(self, row: str, protocol: str, people: list[_Person], attacker: str, hits: np.ndarray) -> None:
        for person, hit in zip(people, hits, strict=True):
            self.records.setdefault((row, protocol, person.image, person.person), {})[attacker] = float(hit)

    def write_records(self, path: str | Path, rows: Sequence[str]) -> None:
        """``attacks.jsonl`` (beside ``faces.jsonl``): one line per row, protocol and person, with the person's
        identity and each attacker's rank-1 hit on it (1: found; 1/k: tied with k - 1 others at the top; 0: missed),
        after :meth:`results`.

        Args:
            path: the file.
            rows: the table's rows, in order.
        """
        order = {row: i for i, row in enumerate(rows)}
        with Path(path).open("w", encoding="utf-8") as handle:
            for (row, protocol, image, person), hits in sorted(
                self.records.items(), key=lambda item: (order.get(item[0][0], len(order)), *item[0][1:])
            ):
                identity = self.persons[(image, person)].identity
                line = {"row": row, "protocol": protocol, "image": image, "person": person, "identity": identity}
                handle.write(json.dumps({**line, "rank1": hits}) + "\n")

    # -- reading -------------------------------------------------------------------------------------------------

    def _read(self, image: Image.Image, boxes: np.ndarray, faces: FaceSet) -> list[_Reading]:
        """Readings of the persons at ``boxes`` (xyxy in [0, 1]) in one photo whose faces are ``faces``."""
        width, height = image.size
        scale = np.array([width, height, width, height], dtype=np.float64)
        requested = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
        assigned = dict(match_faces(requested, faces.boxes))
        # Every face the records name or the detector finds, painted over before any crop: what the no-face
        # attackers read holds no face pixel, whatever the crop's size (a face missed by both is not hidden).
        found = np.asarray(faces.boxes, dtype=np.float64).reshape(-1, 4)
        no_faces = hide_faces(image, np.concatenate([requested, found]))
        crops = [person_crop(image, box, self.crop_size, self.extent) for box in boxes]
        hidden = [person_crop(no_faces, box, self.crop_size, self.extent) for box in boxes]
        context = None
        if self.context is not None and crops:  # the whole crop, then the crop without faces, in one batch
            context = self.context([crop for crop, _ in crops] + [crop for crop, _ in hidden])
        readings = []
        for i, (crop, face) in enumerate(hidden):
            features = {"appearance": appearance_features(crop, face)}
            if context is not None:
                features["context"] = context[i].astype(np.float64)
                features["context_no_face"] = context[len(crops) + i].astype(np.float64)
            j = assigned.get(i)
            for name, embeddings in faces.embeddings.items():
                features[f"face:{name}"] = unit(embeddings[j : j + 1])[0] if j is not None else None
            attributes = (
                np.array([faces.ages[j], faces.genders[j]], dtype=np.float64) if j is not None else np.full(2, np.nan)
            )
            readings.append(_Reading(features, attributes))
        return readings

    def observe_originals(
        self,
        names: Sequence[str],
        images: Sequence[Image.Image],
        boxes: Sequence[np.ndarray],
        indices: Sequence[Sequence[int]],
        faces: Sequence[FaceSet],
        analyze: Any,
    ) -> None:
        """Read each person of the original photos, and of its other views.

        Args:
            names: the images' names.
            images: the original photos.
            boxes: per image, the persons' face boxes ``[P, 4]`` (xyxy in [0, 1]).
            indices: per image, each person's index in the image's records.
            faces: per image, the faces found in it.
            analyze: the face analyzer (photo -> :class:`FaceSet`), for the other views.
        """
        for name, image, image_boxes, image_indices, image_faces in zip(
            names, images, boxes, indices, faces, strict=True
        ):
            for index, reading in zip(image_indices, self._read(image, image_boxes, image_faces), strict=True):
                identity = self.other_views.identity(name, int(index)) if self.other_views is not None else None
                person = _Person(name, int(index), identity or f"{name}#{index}", reading)
                if self.other_views is not None and identity is not None:
                    for view in self.other_views.views(name, int(index)):
                        (reading,) = self._read(view.image, np.asarray([view.box]), analyze(view.image))
                        reading.photo = view.name
                        person.views.append(reading)
                self.persons[(name, int(index))] = person

    def observe_row(
        self,
        row: str,
        names: Sequence[str],
        outputs: Sequence[Image.Image],
        boxes: Sequence[np.ndarray],
        indices: Sequence[Sequence[int]],
        faces: Sequence[FaceSet],
    ) -> None:
        """Read each person in one row's outputs (at the person's box: an attacker that finds every person).

        Args:
            row: the evaluated row.
            names: the images' names.
            outputs: the row's outputs.
            boxes: per image, the persons' face boxes.
            indices: per image, each person's index in the image's records.
            faces: per image, the faces found in the output.
        """
        for name, image, image_boxes, image_indices, image_faces in zip(
            names, outputs, boxes, indices, faces, strict=True
        ):
            for index, reading in zip(image_indices, self._read(image, image_boxes, image_faces), strict=True):
                self.persons[(name, int(index))].outputs[row] = reading

    def gather(self) -> None:
        """Every process's persons (their readings are merged per person: each process read its own images)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, self.persons)
        merged: dict[tuple[str, int], _Person] = {}
        for part in parts:
            for key, person in part.items():
                merged.setdefault(key, person).outputs.update(person.outputs)
        self.persons = merged

    def save(self, path: str | Path) -> None:
        """Write the readings (``attack_readings.pkl`` beside the results): :func:`main` measures the attackers again
        from it with other settings, without generating a single image.

        Args:
            path: the file.
        """
        with Path(path).open("wb") as handle:
            pickle.dump({"version": READINGS_VERSION, "persons": self.persons}, handle)

    def load(self, path: str | Path) -> PrivacyAttacks:
        """Read the readings :meth:`save` wrote (only your own run folders' files: this unpickles).

        Args:
            path: the file.
        """
        with Path(path).open("rb") as handle:
            saved = pickle.load(handle)
        if saved.get("version") != READINGS_VERSION:
            raise ValueError(f"{path}: readings of another version ({saved.get('version')}); evaluate again")
        self.persons = saved["persons"]
        return self

    # -- measuring -----------------------------------------------------------------------------------------------

    def _gallery(self, protocol: str, people: list[_Person]) -> tuple[list[_Reading], list[str], list[str]]:
        """The protocol's gallery readings, their identities, and each probe's own identity key."""
        if protocol == "same_image":  # one reference per person: its original photo
            keys = [f"{p.image}#{p.person}" for p in people]
            return [p.original for p in people], keys, keys
        # Every other photo of each identity (two evaluated persons of one identity share theirs, once each). A
        # person's *own* column is scored on its own other views only (_own_views): the union may hold the photo
        # it was anonymized from (its identity's other evaluated person's view of it).
        readings, identities, seen = [], [], set()
        for p in people:
            for view in p.views:
                key = (p.identity, view.photo if view.photo is not None else id(view))
                if key not in seen:
                    seen.add(key)
                    readings.append(view)
                    identities.append(p.identity)
        return readings, identities, [p.identity for p in people]

    def results(self, rows: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per row, the ``attack/<attacker>/<protocol>/<measure>`` results (with ``_se``), the floor and the worst
        case (``attack/worst/<protocol>/rank1`` and ``.../attacker``).

        Args:
            rows: the evaluated rows.
        """
        everyone = [self.persons[key] for key in sorted(self.persons)]
        out: dict[str, dict[str, Any]] = {row: {} for row in rows}
        if not everyone:
            return out
        names = list(everyone[0].original.features)
        for protocol in PROTOCOLS:
            # Other view: the persons with another photo (real data may have none for some; the mini world has all).
            people = everyone if protocol == "same_image" else [p for p in everyone if p.views]
            if not people:
                continue
            images = [p.image for p in people]
            readings, identities, own_keys = self._gallery(protocol, people)
            floor = self._floor(protocol, people, readings, identities, own_keys, images)
            calibration = {}  # unanonymized probes set each frozen attacker's thresholds
            for name in names:
                originals = [p.original for p in people]
                scores, own = self._scores(name, originals, readings, identities, own_keys, protocol, people)
                calibration[name] = {far: impostor_threshold(scores, own, far) for far in FALSE_ACCEPT_RATES}
            for row in rows:
                result = out[row]
                result.update({f"attack/{FLOOR}/{protocol}/{k}": v for k, v in floor.items() if k != "n"})
                # Every attacker's rank-1 over all persons and its error, the adaptive one's gallery sizes included
                # (adaptive@few: two references per identity): the worst case is the highest.
                candidates: dict[str, tuple[float, float]] = {}
                for name in names:
                    probes = [p.outputs[row] for p in people]
                    scores, own = self._scores(name, probes, readings, identities, own_keys, protocol, people)
                    hits = rank1_hits(scores, own)
                    self._record(row, protocol, people, name, hits)
                    genuine = genuine_scores(scores, own)
                    measures = summarize(hits, images, genuine, calibration[name], self.seed)
                    if name.startswith("face:"):  # persons whose face was found in the output and the gallery
                        seen = np.isfinite(genuine)
                        measures["rank1_matched"] = float(hits[seen].mean()) if seen.any() else float("nan")
                        measures["matched"] = float(seen.mean())
                    result.update({f"attack/{name}/{protocol}/{k}": v for k, v in measures.items()})
                    candidates[name] = (measures["rank1"], measures["rank1_se"])
                if self.adaptive is not None and set(self.adaptive.parts) <= set(names):
                    adaptive = self._adaptive(row, protocol, people, readings, identities, own_keys, images)
                    result.update({f"attack/adaptive/{protocol}/{k}": v for k, v in adaptive.items()})
                    for gallery in ("", *(f"@{k}" for k in self.references)):
                        if f"rank1{gallery}" in adaptive:
                            candidates[f"adaptive{gallery}"] = (
                                adaptive[f"rank1{gallery}"],
                                adaptive[f"rank1{gallery}_se"],
                            )
                finite = {name: v for name, v in candidates.items() if np.isfinite(v[0])}
                worst = max(finite, key=lambda name: (finite[name][0], name)) if finite else None
                value, error = finite[worst] if worst is not None else (float("nan"), float("nan"))
                result[f"attack/{WORST}/{protocol}/rank1"] = value
                result[f"attack/{WORST}/{protocol}/rank1_se"] = error
                result[f"attack/{WORST}/{protocol}/attacker"] = worst
        return out

    @staticmethod
    def _scores(
        name: str, probes: list[_Reading], readings: list[_Reading], identities: list[str], own_keys: list[str],
        protocol: str, people: list[_Person], references: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Cosine scores of ``probes`` against each identity's template of feature ``name``, and each probe's own
        column; in the other-view protocol a probe's own column is its own other views' template (never the photo it
        came from)."""
        vectors = [r.features[name] for r in readings], [p.features[name] for p in probes]
        dim = next((len(v) for side in vectors for v in side if v is not None), 1)  # one side may have seen no face
        gallery, probe = _stack(vectors[0], dim), _stack(vectors[1], dim)
        columns = list(dict.fromkeys(identities))
        scores = np.full((len(probes), len(columns)), np.nan)
        template, names = templates(gallery, identities, references)
        with np.errstate(invalid="ignore"):
            if names:
                scores[:, [columns.index(n) for n in names]] = probe @ template.T
        own = own_columns(own_keys, columns)
        if protocol == "other_view":
            for i, person in enumerate(people):
                if own[i] < 0:  # its identity has no other photo: no column to score
                    continue
                views = _stack([v.features[name] for v in person.views], dim)
                mine, seen = templates(views, [person.identity] * len(views), references)
                with np.errstate(invalid="ignore"):
                    scores[i, own[i]] = float(probe[i] @ mine[0]) if seen else np.nan
        return scores, own

    def _floor(
        self, protocol: str, people: list[_Person], readings: list[_Reading], identities: list[str],
        own_keys: list[str], images: list[str],
    ) -> dict[str, float]:  # fmt: skip
        """The attribute floor: age and gender as the face pack reads them in the original (what the anonymizer
        promises to keep) against those it reads in the gallery; what it cannot read is a guess (ties below any
        read score), so a person whose face is not read scores chance, not zero."""
        probe = np.stack([p.original.attributes for p in people])
        scores, columns = attribute_scores(probe, np.stack([r.attributes for r in readings]), identities)
        own = own_columns(own_keys, columns)
        if protocol == "other_view":  # its own column: its own other views (never the photo it came from)
            for i, person in enumerate(people):
                if own[i] < 0:  # its identity has no other photo: no column to score
                    continue
                mine, _ = attribute_scores(probe[i : i + 1], np.stack([v.attributes for v in person.views]),
                                           [person.identity] * len(person.views))  # fmt: skip
                scores[i, own[i]] = mine[0, 0]
        unread = -10.0  # below any read score (at least -2): an identity it cannot read ranks after those it can
        hits = rank1_hits(np.nan_to_num(scores, nan=unread), own)
        guessed = (own >= 0) & ~np.isfinite(scores[np.arange(len(own)), np.maximum(own, 0)])
        hits[guessed] = 1.0 / max(scores.shape[1], 1)  # its own identity unread: a random pick among all
        return summarize(hits, images, seed=self.seed)

    def _adaptive(
        self, row: str, protocol: str, people: list[_Person], readings: list[_Reading], identities: list[str],
        own_keys: list[str], images: list[str],
    ) -> dict[str, float]:  # fmt: skip
        cfg = self.adaptive
        assert cfg is not None
        parts = list(cfg.parts)
        seen = [*(p.outputs[row] for p in people), *readings]
        dims = [next((len(r.features[part]) for r in seen if r.features[part] is not None), 1) for part in parts]
        probe = [
            _stack([p.outputs[row].features[part] for p in people], dim) for part, dim in zip(parts, dims, strict=True)
        ]
        fold = identity_folds([p.identity for p in people], cfg.folds, salt=protocol)
        code = {identity: i for i, identity in enumerate(dict.fromkeys(p.identity for p in people))}
        trained = {}
        for f in range(cfg.folds):
            pairs_probe, pairs_gallery, groups = [], [], []  # groups: pairs of one identity are not negatives
            for i in np.flatnonzero(fold != f):
                references = [people[i].original] if protocol == "same_image" else people[i].views
                for reference in references:
                    pairs_probe.append(i)
                    pairs_gallery.append(reference)
                    groups.append(code[people[i].identity])
            if len(set(groups)) < 2:
                log.warning(
                    "%s, %s: the adaptive attacker needs persons of at least two identities outside each of its %d "
                    "folds; it is left out (evaluate more images)",
                    row,
                    protocol,
                    cfg.folds,
                )
                return {"rank1": float("nan"), "rank1_se": float("nan"), "n": float(len(people))}
            trained[f] = train_attacker(
                [probe[k][pairs_probe] for k in range(len(parts))],
                [_stack([r.features[part] for r in pairs_gallery], dim) for part, dim in zip(parts, dims, strict=True)],
                np.array(groups),
                cfg,
                seed=self.seed + f,
            )
        result: dict[str, float] = {}
        galleries = {"": None, **({f"@{k}": v for k, v in self.references.items()} if protocol == "other_view" else {})}
        for suffix, references in galleries.items():
            probes = [p.outputs[row] for p in people]
            similarities = np.stack(  # [parts, persons, identities]: every part scores every identity (NaN: unseen)
                [
                    self._scores(part, probes, readings, identities, own_keys, protocol, people, references)[0]
                    for part in parts
                ]
            )
            own = own_columns(own_keys, list(dict.fromkeys(identities)))
            hits = np.zeros(len(people))
            for f, module in trained.items():
                test = np.flatnonzero(fold == f)
                hits[test] = rank1_hits(module.combine(similarities[:, test]), own[test])
            if not suffix:
                self._record(row, protocol, people, "adaptive", hits)
            measures = summarize(hits, images, seed=self.seed)
            result[f"rank1{suffix}"] = measures["rank1"]
            result[f"rank1{suffix}_se"] = measures["rank1_se"]
        for f, module in trained.items():  # what the attacker learned to trust, per fold
            for part, weight in zip(parts, module.weights.detach().tolist(), strict=True):
                result[f"weight/{part}/fold{f}"] = float(weight)
        result["n"] = float(len(people))
        return result


def _stack(vectors: list[np.ndarray | None], dim: int | None = None) -> np.ndarray:
    """Rows of one feature, ``None`` (not seen) as a row of NaN (``dim`` wide; default: the first seen row's width)."""
    dim = dim if dim is not None else next((len(v) for v in vectors if v is not None), 1)
    return np.stack([v if v is not None else np.full(dim, np.nan) for v in vectors])


def main(argv: list[str] | None = None) -> int:
    """``python -m camouflage_train.modules.privacy_attacks <run>/attack_readings.pkl [--steps N ...]``: measure the
    attackers again on an evaluation's saved readings (the adaptive attacker with other settings), print one line per
    row with every attacker's rank-1 per protocol.

    Args:
        argv: the command line (default ``sys.argv``).
    """
    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0] if main.__doc__ else None)
    parser.add_argument("readings", type=Path)
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: every row in the readings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-adaptive", action="store_true")
    for spec in dataclasses.fields(AdaptiveAttackerConfig):
        if isinstance(spec.default, tuple):
            parser.add_argument(f"--{spec.name.replace('_', '-')}", nargs="+", default=list(spec.default))
        else:
            parser.add_argument(f"--{spec.name.replace('_', '-')}", type=type(spec.default), default=spec.default)
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AdaptiveAttackerConfig)}
    cfg = AdaptiveAttackerConfig(**{**values, "parts": tuple(values["parts"])})
    attacks = PrivacyAttacks(adaptive=None if args.no_adaptive else cfg, seed=args.seed).load(args.readings)
    rows = (
        args.rows.split(",")
        if args.rows
        else list(dict.fromkeys(r for p in attacks.persons.values() for r in p.outputs))
    )
    results = attacks.results(rows)
    for row in rows:
        measures = " ".join(
            f"{key.removeprefix('attack/').removesuffix('/rank1')}={value:.3f}"
            for key, value in results[row].items()
            if key.endswith("/rank1")
        )
        print(f"{row}: {measures}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
