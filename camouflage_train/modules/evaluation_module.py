"""Joint evaluation of anonymizers: every row anonymizes the same batch with the same seeds, then shares
one set of metrics definitions (re-ID per recogniser, attributes, FID/KID, CLIP-T/CLIP-I).
Besides the aggregate table, every output face is recorded (``faces.jsonl``: which image, which face, what
was read in it), and the face measures get bootstrap standard errors over images (``<measure>_se``).

Rows are anonymizers with the one interface of :mod:`camouflage_train.pipelines.anonymizer` (identity, VAE
reconstruction, blur, CAMOUFLaGE-Base and -Light by default; any other one from config). All metrics are
torchmetrics ``Metric``s, so the Trainer's devices/processes give the same numbers as one process.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.image import FrechetInceptionDistance, KernelInceptionDistance, StructuralSimilarityIndexMeasure
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

from camouflage_train.data.images import pixels_to_image
from camouflage_train.data.sampling import image_seed
from camouflage_train.metrics.attributes import AttributePreservation, BoxAgreement
from camouflage_train.metrics.clip import ClipScorer, ClipScores, WeightsUnavailableError
from camouflage_train.metrics.faces import FaceAnalyzer, FaceSet
from camouflage_train.metrics.privacy_utility import plot_privacy_utility
from camouflage_train.metrics.reid import ReIdentification, box_iou, match_faces, requested_box_iou
from camouflage_train.metrics.structure import edge_iou
from camouflage_train.metrics.uncertainty import bootstrap_standard_errors
from camouflage_train.models.conditioning import PersonBatch
from camouflage_train.modules.privacy_attacks import PrivacyAttacks
from camouflage_train.pipelines.anonymizer import Anonymizer
from camouflage_train.utils.config_checks import ConfigError
from camouflage_train.utils.images import with_column_labels

log = logging.getLogger(__name__)


def _fid_metrics(feature: int | nn.Module, kid_subset_size: int) -> tuple[FrechetInceptionDistance, Any]:
    try:
        fid = FrechetInceptionDistance(feature=feature, normalize=False)
        kid = KernelInceptionDistance(feature=feature, subset_size=kid_subset_size, normalize=False)
    except Exception as err:  # torchmetrics downloads Inception weights on construction
        raise WeightsUnavailableError(
            f"FID/KID: the feature extractor could not be built ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "The default Inception needs torch-fidelity's weights-inception-2015-12-05 (downloaded on first use); "
            "offline, copy it to ~/.cache/torch/hub/checkpoints/ or set metrics.fid.feature to another extractor."
        ) from err
    return fid, kid


class JointEvaluationModule(L.LightningModule):
    """``test_step`` anonymizes each batch with every row and updates each row's metrics.

    Args:
        anonymizers: row name -> anonymizer (``(images, persons, seeds, prompts) -> images``); the order is the
            table's. They are moved to this process's device when testing starts.
        faces: detector + recognisers for re-ID and attributes.
        clip: open_clip scorer for CLIP-T/CLIP-I.
        fid_feature: torchmetrics FID/KID ``feature`` (2048 = Inception, or an ``nn.Module``).
        kid_subset_size: KID subset size (at most the number of evaluated images).
        output_dir: where results and sample grids go (rank 0 writes).
        grid_batches: how many batches get a sample grid (original | each row).
        seed: image seeds derive from it and the image names; the bootstrap's too.
        attacks: the re-identification attackers beyond the face recognisers (``None``: none); their
            ``attack/...`` measures join each row's results.
    """

    def __init__(
        self,
        anonymizers: Mapping[str, Anonymizer],
        faces: FaceAnalyzer,
        clip: ClipScorer,
        fid_feature: int | nn.Module = 2048,
        kid_subset_size: int = 100,
        output_dir: str = ".",
        grid_batches: int = 2,
        seed: int = 0,
        attacks: PrivacyAttacks | None = None,
    ) -> None:
        super().__init__()
        self.attacks = attacks
        self.anonymizers = dict(anonymizers)
        self.rows = list(self.anonymizers)
        # Module names cannot hold "." (sweep rows like base@guidance=0.5 do): metrics are kept under indices.
        self.key = {row: f"row{i}" for i, row in enumerate(self.rows)}
        self.faces, self.clip, self.seed = faces, clip, seed
        self.output_dir, self.grid_batches = Path(output_dir), grid_batches
        self.kid_subset_size = kid_subset_size
        self.reid = nn.ModuleDict(
            {
                self.key[row]: nn.ModuleDict(
                    {rec: ReIdentification(threshold=t) for rec, t in faces.thresholds.items()}
                )
                for row in self.rows
            }
        )
        self.attributes = nn.ModuleDict({self.key[row]: AttributePreservation() for row in self.rows})
        self.boxes = nn.ModuleDict({self.key[row]: BoxAgreement() for row in self.rows})
        self.clip_scores = nn.ModuleDict({self.key[row]: ClipScores() for row in self.rows})
        self.edges = nn.ModuleDict({self.key[row]: MeanMetric() for row in self.rows})
        # Generation time per image: seconds and images of every batch but each process's first (warm-up: lazy
        # weights, caches, allocator), summed over processes; every row runs on the same device, batches and dtype.
        self.seconds = nn.ModuleDict({self.key[row]: SumMetric() for row in self.rows})
        self.timed_images = nn.ModuleDict({self.key[row]: SumMetric() for row in self.rows})
        self.ssim = nn.ModuleDict(
            {self.key[row]: StructuralSimilarityIndexMeasure(data_range=1.0) for row in self.rows}
        )
        fids, kids = zip(*(_fid_metrics(fid_feature, kid_subset_size) for _ in self.rows), strict=True)
        self.fid, self.kid = (
            nn.ModuleDict(dict(zip(self.key.values(), fids, strict=True))),
            nn.ModuleDict(dict(zip(self.key.values(), kids, strict=True))),
        )
        self.results: list[dict[str, Any]] = []
        self.face_records: list[dict[str, Any]] = []  # one per (row, image): see face_record

    def on_test_start(self) -> None:
        self._check_kid_subset_size()
        self.face_records = []
        for anonymizer in self.anonymizers.values():
            anonymizer.to(self.device)
        self.clip.to(self.device)
        if self.attacks is not None:
            self.attacks.reset()
            self.attacks.to(self.device)

    def _check_kid_subset_size(self) -> None:
        """KID draws subsets of ``kid_subset_size`` images; with fewer images torchmetrics fails only in
        ``compute``, after every row has run. Say so before the first batch, naming the two settings."""
        loaders = self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        try:
            images = sum(len(loader.dataset) for loader in loaders)
        except TypeError:  # an iterable dataset: its size is unknown until it has run
            return
        if images < self.kid_subset_size:
            raise ConfigError(
                f"metrics.fid.kid_subset_size={self.kid_subset_size} is more than the {images} images of the "
                f"evaluation split: set metrics.fid.kid_subset_size to at most {images}, or evaluate more images"
            )

    def _update_faces(
        self,
        row: str,
        names: list[str],
        originals: list[FaceSet],
        outputs: list[FaceSet],
        requested: list[np.ndarray],
    ) -> None:
        ages, genders, poses = [], [], []
        for name, boxes, original, output in zip(names, requested, originals, outputs, strict=True):
            box_ious = requested_box_iou(boxes, output.boxes)
            self.boxes[self.key[row]].update(torch.as_tensor(box_ious))
            pairs = match_faces(original.boxes, output.boxes)
            self.face_records.append(face_record(row, name, boxes, box_ious, original, output, pairs))
            matched_o = [i for i, _ in pairs]
            unmatched = [i for i in range(len(original.boxes)) if i not in matched_o]
            for rec, metric in self.reid[self.key[row]].items():
                emb_o, emb_a = original.embeddings[rec], output.embeddings[rec]
                # Empty rows keep [0, D], D from whichever side has a face (a process without any keeps 1).
                width = next((e.shape[-1] for e in (emb_o, emb_a) if np.ndim(e) == 2 and len(e)), 1)
                take = lambda e, idx, w=width: torch.as_tensor(e[idx] if idx else np.zeros((0, w)), dtype=torch.float32)  # noqa: E731
                metric.update(take(emb_o, matched_o), take(emb_a, [j for _, j in pairs]), take(emb_o, unmatched))
            for i, j in pairs:
                ages.append([original.ages[i], output.ages[j]])
                genders.append([original.genders[i], output.genders[j]])
                poses.append([original.poses[i], output.poses[j]])
        if ages:
            self.attributes[self.key[row]].update(
                torch.tensor(ages), torch.tensor(genders), torch.tensor(np.array(poses))
            )

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch.get("size", 1) == 0:
            return
        originals = [pixels_to_image(p) for p in batch["pixel_values"]]
        seeds = [image_seed(self.seed, name) for name in batch["name"]]
        original_faces = [self.faces(image) for image in originals]
        real_uint8 = torch.stack([TF.pil_to_tensor(image) for image in originals]).to(self.device)
        original_clip = self.clip.image_features(originals)
        prompts = list(batch["caption"])
        caption_clip = self.clip.text_features(prompts)
        persons = PersonBatch.from_batch(batch)
        width, height = originals[0].size
        scale = np.array([width, height, width, height], dtype=np.float64)
        person_boxes = [  # each image's persons, xyxy in [0, 1]
            b.cpu().double().numpy()[m.cpu().numpy()] for b, m in zip(persons.boxes, persons.mask, strict=True)
        ]
        requested = [boxes * scale for boxes in person_boxes]  # where the outputs should show faces, in pixels
        names = list(batch["name"])
        if self.attacks is not None and self.attacks.other_views is not None and "person_index" not in batch:
            raise ConfigError(
                "other_views needs each person's record index in the batch ('person_index', from "
                "PersonImageDataset): a batch without it cannot say which person is which; set other_views=null"
            )
        person_index = [  # each person's index in its image's records (the identities' key)
            index.cpu().numpy()[m.cpu().numpy()] if index is not None else np.flatnonzero(m.cpu().numpy())
            for index, m in zip(batch.get("person_index", [None] * len(names)), persons.mask, strict=True)
        ]
        if self.attacks is not None:
            self.attacks.observe_originals(names, originals, person_boxes, person_index, original_faces, self.faces)
        grid = [real_uint8.cpu()]
        for row, anonymize in self.anonymizers.items():
            start = time.perf_counter()
            made = anonymize(originals, persons, seeds, prompts)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if batch_idx > 0:
                self.seconds[self.key[row]].update(time.perf_counter() - start)
                self.timed_images[self.key[row]].update(len(made))
            outputs = [image.convert("RGB").resize(originals[0].size) for image in made]
            fake_uint8 = torch.stack([TF.pil_to_tensor(image) for image in outputs]).to(self.device)
            output_faces = [self.faces(image) for image in outputs]
            self._update_faces(row, names, original_faces, output_faces, requested)
            if self.attacks is not None:
                self.attacks.observe_row(row, names, outputs, person_boxes, person_index, output_faces)
            self.fid[self.key[row]].update(real_uint8, real=True)
            self.fid[self.key[row]].update(fake_uint8, real=False)
            self.kid[self.key[row]].update(real_uint8, real=True)
            self.kid[self.key[row]].update(fake_uint8, real=False)
            self.clip_scores[self.key[row]].update(self.clip.image_features(outputs), original_clip, caption_clip)
            pairs = zip(originals, outputs, strict=True)
            self.edges[self.key[row]].update(torch.tensor([edge_iou(a, b) for a, b in pairs], dtype=torch.float64))
            self.ssim[self.key[row]].update(fake_uint8.float() / 255, real_uint8.float() / 255)
            grid.append(fake_uint8.cpu())
        if batch_idx < self.grid_batches and self.trainer.is_global_zero:
            tiles = torch.stack(grid, dim=1).flatten(0, 1)  # per image: original, then each row
            path = self.output_dir / "samples" / f"batch_{batch_idx:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture = TF.to_pil_image(make_grid(tiles, nrow=len(grid), padding=2))
            picture.save(path)  # tiles only, for report.py's --grid
            step = tiles.shape[-1] + 2
            labelled = with_column_labels(picture, ["original", *self.rows], step, 2)
            labelled.save(path.with_name(f"batch_{batch_idx:03d}_labelled.png"))

    def on_test_epoch_end(self) -> None:
        records = gather_records(self.face_records, self.rows)
        errors = bootstrap_standard_errors(records, list(self.faces.thresholds), seed=self.seed)
        attacks: dict[str, dict[str, Any]] = {}
        if self.attacks is not None:
            self.attacks.gather()
            attacks = self.attacks.results(self.rows)
        self.results = []
        for row in self.rows:
            result: dict[str, Any] = {"model": row}
            for rec, metric in self.reid[self.key[row]].items():
                for key, value in metric.compute().items():
                    result[f"reid/{rec}/{key}"] = float(value)
            result.update({f"attr/{k}": float(v) for k, v in self.attributes[self.key[row]].compute().items()})
            result["attr/box_iou"] = float(self.boxes[self.key[row]].compute())
            result["struct/edge_iou"] = float(self.edges[self.key[row]].compute())
            result["struct/ssim"] = float(self.ssim[self.key[row]].compute())
            clip = self.clip_scores[self.key[row]].compute()
            result["clip/clip_t"], result["clip/clip_i"] = float(clip["clip_t"]), float(clip["clip_i"])
            result["n_images"] = int(clip["n"])  # synchronized across processes
            result["fid"] = float(self.fid[self.key[row]].compute())
            kid_mean, kid_std = self.kid[self.key[row]].compute()
            result["kid_mean"], result["kid_std"] = float(kid_mean), float(kid_std)
            images = float(self.timed_images[self.key[row]].compute())
            result["time/seconds_per_image"] = (
                float(self.seconds[self.key[row]].compute()) / images if images else math.nan
            )
            result.update({f"{key}_se": value for key, value in errors.get(row, {}).items()})
            result.update(attacks.get(row, {}))
            self.results.append(result)
        flat = {f"{r['model']}/{k}": v for r in self.results for k, v in r.items() if isinstance(v, (int, float))}
        self.log_dict({k: float(v) for k, v in flat.items()}, sync_dist=False, rank_zero_only=True)
        if self.trainer.is_global_zero:
            write_face_records(records, self.output_dir)
            if self.attacks is not None:
                self.attacks.save(self.output_dir / "attack_readings.pkl")
                self.attacks.write_records(self.output_dir / "attacks.jsonl", self.rows)
            write_results(self.results, self.output_dir)
            figure = plot_privacy_utility(self.results, self.output_dir / "privacy_utility.png")
            for logger in self.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="eval/privacy_utility", images=[figure])
                if hasattr(logger, "log_table"):
                    columns = list(self.results[0])
                    logger.log_table(
                        key="eval/results", columns=columns, data=[[r[c] for c in columns] for r in self.results]
                    )

    def configure_optimizers(self) -> None:
        return None


def face_record(
    row: str,
    name: str,
    requested: np.ndarray,
    requested_iou: np.ndarray,
    original: FaceSet,
    output: FaceSet,
    pairs: list[tuple[int, int]],
) -> dict[str, Any]:
    """What the evaluation saw in one output image, face by face: the aggregate metrics say *how often* a row
    fails, these records say *where* (which image, which face size, which attribute), so failures can be
    looked at and grouped without rerunning generation.

    Args:
        row: the evaluated row.
        name: the image's name.
        requested: the persons' boxes asked for, in pixels.
        requested_iou: each request's IoU with its assigned output face.
        original: the faces found in the original.
        output: the faces found in the output.
        pairs: matched (original, output) face indices.
    """
    rounded = lambda a: np.round(np.asarray(a, dtype=np.float64), 4).tolist()  # noqa: E731
    matched = dict(pairs)
    faces = []
    for i in range(len(original.boxes)):
        face: dict[str, Any] = {
            "box": rounded(original.boxes[i]),
            "age": float(original.ages[i]),
            "gender": int(original.genders[i]),
            "pose": rounded(original.poses[i]),
            "output": None,
        }
        if i in matched:
            j = matched[i]
            cosine = {
                rec: float(np.dot(_unit(original.embeddings[rec][i]), _unit(output.embeddings[rec][j])))
                for rec in original.embeddings
            }
            face["output"] = {
                "box": rounded(output.boxes[j]),
                "iou": float(box_iou(original.boxes[i : i + 1], output.boxes[j : j + 1])[0, 0]),
                "age": float(output.ages[j]),
                "gender": int(output.genders[j]),
                "pose": rounded(output.poses[j]),
                "cosine": cosine,
            }
        faces.append(face)
    return {
        "row": row,
        "image": name,
        "requested": [{"box": b, "iou": float(v)} for b, v in zip(rounded(requested), requested_iou, strict=True)],
        "detected": len(output.boxes),
        "faces": faces,
    }


def _unit(vector: np.ndarray) -> np.ndarray:
    return np.asarray(vector, dtype=np.float64) / max(float(np.linalg.norm(vector)), 1e-12)


def gather_records(records: list[dict[str, Any]], rows: list[str]) -> list[dict[str, Any]]:
    """Every process's records, in the table's row order, then by image (the same file whatever the number of
    processes).

    Args:
        records: this process's records.
        rows: the table's rows in order.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, records)
        records = [record for part in parts for record in part]
    return sorted(records, key=lambda r: (rows.index(r["row"]), r["image"]))


def write_face_records(records: list[dict[str, Any]], output_dir: Path) -> None:
    """``faces.jsonl``: one line per row and image (see :func:`face_record`).

    Args:
        records: every process's records.
        output_dir: the run folder.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "faces.jsonl").open("w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


def write_results(results: list[dict[str, Any]], output_dir: Path) -> str:
    """``results.{json,csv,md}`` in ``output_dir``; returns the Markdown table (also logged).

    Args:
        results: one row of measures per anonymizer.
        output_dir: the run folder.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    columns = list(results[0])
    with (output_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(results)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    table = "\n".join(
        [
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            *("| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in results),
        ]
    )
    (output_dir / "results.md").write_text(table + "\n")
    log.info("evaluation results:\n%s", table)
    print(table)
    return table
