"""Train the mini face pack on synthetic scenes and export it in insightface's layout.

* ``det_mini.onnx`` (SCRFD format): finds the faces drawn by :mod:`camouflage_train.data.synthetic` and their five
  keypoints, trained on scenes degraded like generated images (blur, noise, colour shifts).
* ``genderage_mini.onnx`` (96x96, insightface's attribute crop): gender from the hair length, age from the hair
  colour (readable past 45 only: younger hair is a random brown, so young ages are guessed near their mean).
* ``w600k_mini.onnx`` (112x112, aligned by the keypoints): a recogniser trained contrastively on two views of the
  same person (same skin, clothes and young hair colour; another place, size, pose, background and neighbours),
  the second view often passed through the world's VAE: a generated face is at best such a reconstruction, so a
  recogniser blind through it could not tell anonymization from the decoder's own colour shifts.

``FaceAnalysis(name=<folder>)`` loads the folder like ``buffalo_l``; the recogniser file alone is a recogniser.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from camouflage_train.data.synthetic import (
    Appearance,
    draw_background,
    draw_person,
    draw_scene,
    face_keypoints,
    sample_appearance,
    sample_person,
)
from camouflage_train.miniworld.face_nets import DET_STRIDE, SCRFD_STRIDES, CropNet, GridDetector
from camouflage_train.miniworld.scenes import face_schema
from camouflage_train.models.losses import symmetric_info_nce
from camouflage_train.stand_ins.face_pack import export_onnx

DETECTOR, GENDERAGE, RECOGNISER = "det_mini.onnx", "genderage_mini.onnx", "w600k_mini.onnx"
Log = Callable[[str], None]


@dataclass
class FaceBuildConfig:
    """The mini face pack's training recipe (``python -m camouflage_train.miniworld.build --part faces``).

    Args:
        base: whose VAE the recogniser's second views pass through (the build passes the base built next to it).
        seed: the training seed.
        num_scenes: synthetic scenes for the detector and gender/age.
        first_scene_seed: their first seed.
        resolution: the scenes' size in pixels.
        num_identities: identities for the recogniser, each drawn in two scenes.
        batch_size: samples per step.
        lr: the learning rate.
        detector_steps: detector training steps.
        genderage_steps: gender/age training steps.
        recogniser_steps: recogniser training steps.
        feature_steps: FID/KID scene-feature training steps.
        temperature: the recogniser's contrastive loss temperature.
        decoded_views: share of second identity views encoded and decoded by the base's VAE.
        threads: CPU threads (0: torch's default).
    """

    base: str = "preset:mini"  # whose VAE the recogniser sees through (the build passes the base built next to it)
    seed: int = 0
    num_scenes: int = 6000
    first_scene_seed: int = 3_000_000
    resolution: int = 64
    num_identities: int = 8000
    batch_size: int = 64
    lr: float = 2e-3
    detector_steps: int = 2000
    genderage_steps: int = 1500
    recogniser_steps: int = 3000
    feature_steps: int = 800
    temperature: float = 0.1
    decoded_views: float = 0.5  # share of second identity views encoded and decoded by the base's VAE
    threads: int = 0


def degrade(image: Image.Image, rng: np.random.Generator, colour: bool = True) -> Image.Image:
    """Blur, noise and (``colour``) a colour shift of the kind a small generator leaves; a quarter stay clean.

    The recogniser's views keep their colours: skin and hair colour *are* the identity in this world.

    Args:
        image: a face crop or scene.
        rng: random numbers.
        colour: also shift the colours.
    """
    if rng.random() < 0.25:
        return image
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.5))))
    x = np.asarray(image).astype(np.float32)
    if colour:
        x = x * rng.uniform(0.85, 1.15) + rng.normal(0, 8, size=3)
    x = x + rng.normal(0, rng.uniform(0, 8), size=x.shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def visible_fraction(persons: list[dict[str, Any]], resolution: int) -> np.ndarray:
    """How much of each face (its ellipse) the nearer persons leave visible, drawn in the scene's order.

    Args:
        persons: a scene's person records, in drawing order.
        resolution: the scene's size in pixels.
    """
    ids = Image.new("RGB", (resolution, resolution))
    draw = ImageDraw.Draw(ids)
    order = sorted(range(len(persons)), key=lambda i: persons[i]["box"][3])
    for i in order:
        colour = (i + 1,) * 3
        draw_person(draw, persons[i], (resolution, resolution), Appearance(colour, colour, colour))
    seen = np.asarray(ids)[..., 0]
    out = np.zeros(len(persons))
    for i in order:
        alone = Image.new("RGB", (resolution, resolution))
        draw_person(
            ImageDraw.Draw(alone), persons[i], (resolution, resolution), Appearance((0,) * 3, (0,) * 3, (1,) * 3)
        )
        face = np.asarray(alone)[..., 0] == 1
        out[i] = (seen[face] == i + 1).sum() / max(1, face.sum())
    return out


def normalise(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` RGB -> float ``[N, 3, H, W]`` as insightface's ``blobFromImage`` feeds the model.

    Args:
        images: uint8 images ``[N, H, W, 3]``.
        mean: subtracted from every pixel.
        std: then divided by.
    """
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std


def detector_targets(persons: list[dict[str, Any]], visible: np.ndarray, resolution: int) -> np.ndarray:
    """``[16, G, G]``: positive flag (1), ignore flag (-1 for hidden faces), box distances, keypoint offsets.

    Args:
        persons: a scene's person records.
        visible: each face's visible fraction.
        resolution: the scene's size in pixels.
    """
    grid = resolution // DET_STRIDE
    target = np.zeros((16, grid, grid), dtype=np.float32)
    ys, xs = np.mgrid[:grid, :grid] * DET_STRIDE  # SCRFD's anchor points: cell corners
    for i in sorted(range(len(persons)), key=lambda i: persons[i]["box"][3]):  # nearer faces win shared cells
        x0, y0, x1, y1 = (v * resolution for v in persons[i]["box"])
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
        central = (np.abs(xs - cx) <= max(0.3 * w, 4)) & (np.abs(ys - cy) <= max(0.3 * h, 4))
        nearest = np.zeros_like(central)
        nearest.flat[np.argmin((xs - cx) ** 2 + (ys - cy) ** 2)] = True
        cells = central | nearest
        target[0][cells] = 1.0 if visible[i] >= 0.5 else -1.0
        target[1][cells], target[2][cells] = (xs[cells] - x0) / DET_STRIDE, (ys[cells] - y0) / DET_STRIDE
        target[3][cells], target[4][cells] = (x1 - xs[cells]) / DET_STRIDE, (y1 - ys[cells]) / DET_STRIDE
        kps = face_keypoints(persons[i], (resolution, resolution))
        for k, (kx, ky) in enumerate(kps):
            target[5 + 2 * k][cells] = (kx - xs[cells]) / DET_STRIDE
            target[6 + 2 * k][cells] = (ky - ys[cells]) / DET_STRIDE
    return target


def attribute_crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """insightface's genderage crop: centred on the box, 1.5x its longer side, 96x96.

    Args:
        image: an RGB scene ``[H, W, 3]``.
        box: a face box in pixels.
    """
    from insightface.utils import face_align

    w, h = box[2] - box[0], box[3] - box[1]
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    crop, _ = face_align.transform(image, centre, 96, 96 / (max(w, h) * 1.5), 0)
    return crop


def recogniser_crop(image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """insightface's recognition crop: the face aligned on its five keypoints, 112x112.

    Args:
        image: an RGB scene ``[H, W, 3]``.
        kps: the face's five keypoints in pixels.
    """
    from insightface.utils import face_align

    return face_align.norm_crop(image, landmark=kps.astype(np.float32), image_size=112)


def _train(model: torch.nn.Module, steps: int, lr: float, loss_fn: Callable[[int], torch.Tensor], log: Log, name: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # OneCycle needs a warm-up of at least one step: few-step smoke builds warm up for half their steps.
    pct_start = 0.1 if steps >= 20 else 0.5
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 4), pct_start=pct_start)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.perf_counter() - start:.0f} s)")
    return model.eval(), float(np.mean(losses[-100:]))


def _scene_bank(cfg: FaceBuildConfig, rng: np.random.Generator) -> dict[str, Any]:
    schema = face_schema()
    scenes, targets, ga_crops, ga_labels = [], [], [], []
    for seed in range(cfg.first_scene_seed, cfg.first_scene_seed + cfg.num_scenes):
        image, persons = draw_scene(seed, schema, cfg.resolution)
        pixels = np.asarray(degrade(image, rng))
        visible = visible_fraction(persons, cfg.resolution)
        scenes.append(pixels)
        targets.append(detector_targets(persons, visible, cfg.resolution))
        for person, seen in zip(persons, visible, strict=True):
            if seen < 0.7:
                continue
            box = np.array(person["box"]) * cfg.resolution
            w, h = box[2] - box[0], box[3] - box[1]
            jitter = rng.normal(0, 0.06, size=4) * np.array([w, h, w, h])  # a detector's box is not exact
            ga_crops.append(attribute_crop(pixels, box + jitter))
            ga_labels.append((person["gender"] == "male", person["age"] / 100.0))
    return {
        "scenes": np.stack(scenes),
        "targets": torch.from_numpy(np.stack(targets)),
        "ga_crops": np.stack(ga_crops),
        "gender": torch.tensor([g for g, _ in ga_labels], dtype=torch.long),
        "age": torch.tensor([a for _, a in ga_labels], dtype=torch.float32),
    }


def vae_round_trip(base: str, scenes: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 scenes through the evaluation's ``reconstruction`` row: the VAE of ``base`` (a preset
    or folder), encode (latent mean) and decode.

    Args:
        base: a preset or pipeline folder.
        scenes: uint8 scenes ``[N, H, W, 3]``.
        batch_size: scenes per batch.
    """
    from camouflage_train.pipelines.anonymizer import VaeReconstruction

    if not len(scenes):
        return scenes
    with torch.random.fork_rng():  # loading must not move the seeded stream the face nets start from
        reconstruction = VaeReconstruction({"pretrained_model_name_or_path": base})
    decoded = []
    for start in range(0, len(scenes), batch_size):
        images = [Image.fromarray(scene) for scene in scenes[start : start + batch_size]]
        decoded += [np.asarray(image) for image in reconstruction.reconstruct(images)]
    return np.stack(decoded)


def identity_views(cfg: FaceBuildConfig, rng: np.random.Generator) -> np.ndarray:
    """``[I, 2, 112, 112, 3]``: each identity (appearance, age, gender) drawn into two unrelated scenes, aligned;
    the second view passes through the base's VAE with probability ``cfg.decoded_views``.

    Args:
        cfg: the recipe.
        rng: random numbers.
    """
    schema = face_schema()
    views = np.zeros((cfg.num_identities, 2, 112, 112, 3), dtype=np.uint8)
    scenes = np.zeros((cfg.num_identities, 2, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    keypoints = np.zeros((cfg.num_identities, 2, 5, 2), dtype=np.float32)
    for i in range(cfg.num_identities):
        identity = sample_person(rng, schema, [])
        appearance = sample_appearance(rng, identity["age"])
        for v in range(2):
            image = draw_background(rng, cfg.resolution)
            draw = ImageDraw.Draw(image)
            others = [sample_person(rng, schema, []) for _ in range(int(rng.integers(0, 3)))]
            for other in others:
                draw_person(draw, other, image.size, sample_appearance(rng, other["age"]))
            placed = sample_person(rng, schema, [])
            placed.update(age=identity["age"], gender=identity["gender"])
            draw_person(draw, placed, image.size, appearance)  # on top: the view shows the whole face
            scenes[i, v] = np.asarray(image)
            keypoints[i, v] = face_keypoints(placed, image.size) + rng.normal(0, 0.5, size=(5, 2))
    decoded = np.flatnonzero(rng.random(cfg.num_identities) < cfg.decoded_views)
    scenes[decoded, 1] = vae_round_trip(cfg.base, scenes[decoded, 1])
    for i in range(cfg.num_identities):
        for v in range(2):
            pixels = np.asarray(degrade(Image.fromarray(scenes[i, v]), rng, colour=False))
            views[i, v] = recogniser_crop(pixels, keypoints[i, v])
    return views


def build_mini_face_pack(folder: Path, cfg: FaceBuildConfig, log: Log = print) -> dict:
    """Train the three models and write them (ONNX) with ``build.json`` into ``folder``.

    Args:
        folder: the output folder.
        cfg: the recipe.
        log: where progress lines go.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    bank = _scene_bank(cfg, rng)
    views = identity_views(cfg, rng)
    log(f"drew {len(bank['scenes'])} scenes, {len(bank['ga_crops'])} attribute crops, {len(views)} identities "
        f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    n, b = len(bank["scenes"]), cfg.batch_size

    detector = GridDetector()

    def detector_loss(step: int) -> torch.Tensor:
        index = torch.randint(n, (b,), generator=g).numpy()
        x = normalise(bank["scenes"][index], 127.5, 128.0)
        target = bank["targets"][index]
        out = detector.raw(x)
        label = target[:, 0]
        weight = (label >= 0).float()
        positive = label > 0
        score = F.binary_cross_entropy_with_logits(out[:, 0], positive.float(), weight=weight * (1 + 3 * positive))
        mask = positive[:, None].float()
        regression = (F.smooth_l1_loss(out[:, 1:], target[:, 1:15], reduction="none") * mask).sum() / mask.sum().clamp(
            min=1
        )
        return score + 0.1 * regression

    genderage = CropNet(3, 96)

    def genderage_loss(step: int) -> torch.Tensor:
        index = torch.randint(len(bank["ga_crops"]), (b,), generator=g)
        x = normalise(bank["ga_crops"][index.numpy()], 127.5, 128.0)
        out = genderage(x)
        return F.cross_entropy(out[:, :2], bank["gender"][index]) + 2.0 * F.l1_loss(out[:, 2], bank["age"][index])

    recogniser = CropNet(128, 112)

    def recogniser_loss(step: int) -> torch.Tensor:
        index = torch.randint(len(views), (b,), generator=g).numpy()
        pair = normalise(views[index].reshape(-1, 112, 112, 3), 127.5, 127.5)
        z = F.normalize(recogniser(pair), dim=-1).reshape(b, 2, -1)
        return symmetric_info_nce(z[:, 0] @ z[:, 1].T / cfg.temperature)

    metrics: dict[str, Any] = {"config": asdict(cfg)}
    detector, metrics["detector_loss"] = _train(detector, cfg.detector_steps, cfg.lr, detector_loss, log, "detector")
    genderage, metrics["genderage_loss"] = _train(
        genderage, cfg.genderage_steps, cfg.lr, genderage_loss, log, "genderage"
    )
    recogniser, metrics["recogniser_loss"] = _train(
        recogniser, cfg.recogniser_steps, cfg.lr, recogniser_loss, log, "recogniser"
    )
    det_outputs = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in SCRFD_STRIDES]
    export_onnx(detector, torch.zeros(1, 3, 64, 64), folder / DETECTOR, det_outputs, dynamic_hw=True)
    export_onnx(genderage, torch.zeros(1, 3, 96, 96), folder / GENDERAGE, ["fc1"], dynamic_hw=False)
    export_onnx(recogniser, torch.zeros(1, 3, 112, 112), folder / RECOGNISER, ["embedding"], dynamic_hw=False)
    metrics["seconds"] = time.perf_counter() - start
    (folder / "build.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def build_scene_features(folder: Path, cfg: FaceBuildConfig, log: Log = print) -> dict:
    """:class:`SceneFeatures` trained to predict the person count, the face-centre cells and the background.

    Args:
        folder: the output folder.
        cfg: the recipe.
        log: where progress lines go.
    """
    from camouflage_train.miniworld.scenes import draw_bank
    from camouflage_train.stand_ins.scene_features import SceneFeatures

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    bank = draw_bank(cfg.first_scene_seed + cfg.num_scenes, cfg.num_scenes, cfg.resolution)
    persons = bank.persons
    scenes = np.stack([np.asarray(degrade(Image.fromarray(x.permute(1, 2, 0).numpy()), rng)) for x in bank.images])

    grid = cfg.resolution // 8
    count = torch.tensor([len(p) - 1 for p in persons])
    centres = torch.zeros(len(persons), grid, grid)
    for i, records in enumerate(persons):
        for person in records:
            x0, y0, x1, y1 = person["box"]
            centres[i, min(grid - 1, int((y0 + y1) / 2 * grid)), min(grid - 1, int((x0 + x1) / 2 * grid))] = 1.0
    images = torch.from_numpy(scenes).permute(0, 3, 1, 2)
    background = images[:, :, [0, -1], 0].float().flatten(1) / 255.0  # top-left and bottom-left pixels
    model = SceneFeatures().train().requires_grad_(True)
    heads = nn.ModuleDict(
        {"count": nn.Linear(model.num_features, 4), "centre": nn.Conv2d(model.num_features, 1, 1),
         "background": nn.Linear(model.num_features, 6)}
    )  # fmt: skip
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(len(images), (cfg.batch_size,), generator=g)
        cells = model.grid(images[index])
        pooled = cells.mean(dim=(2, 3))
        return (
            F.cross_entropy(heads["count"](pooled), count[index])
            + F.binary_cross_entropy_with_logits(
                heads["centre"](cells)[:, 0], centres[index], pos_weight=torch.tensor(4.0)
            )
            + F.l1_loss(heads["background"](pooled), background[index])
        )

    joint = nn.ModuleList([model, heads])
    _, loss = _train(joint, cfg.feature_steps, cfg.lr, loss_fn, log, "scene features")
    model.requires_grad_(False).eval().save_pretrained(folder)
    metrics = {"config": asdict(cfg), "scene_features_loss": loss}
    (folder / "build.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics
