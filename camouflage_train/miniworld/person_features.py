"""The miniature world's person encoder: the ``context`` attacker of ``attackers=mini``
(``python -m camouflage_train.miniworld.build --part person``).

What a pre-trained image encoder is to real photographs (it was trained on other people, and it reads a whole person
and what is around it), this small conv net is to the mini world: trained contrastively on two photos of each of
thousands of identities (one in a scene of the world, one in another photo: another place, size, head pose, background
and neighbours; the second photo often through the world's VAE), on the person's extent crop
(:func:`camouflage_train.metrics.attacks.person_crop`), face included. None of its identities is an evaluation
identity: its scenes' seeds lie far from every seed the configs use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from camouflage_train.data.synthetic import draw_other_view, draw_scene_identities
from camouflage_train.metrics.attacks import DEFAULT_EXTENT, person_crop
from camouflage_train.miniworld.face_pack import Log, _train, degrade, vae_round_trip
from camouflage_train.miniworld.scenes import face_schema
from camouflage_train.models.losses import symmetric_info_nce
from camouflage_train.stand_ins.scene_features import SceneFeatures


@dataclass
class PersonBuildConfig:
    """The person encoder's recipe.

    Args:
        base: whose VAE the second photos pass through (the build passes the base built next to it).
        seed: the training seed.
        first_scene_seed: the first of its scenes' seeds (far from every scene seed the configs evaluate or train on).
        resolution: the photos' size in pixels.
        num_identities: fresh identities, each drawn in two photos.
        crop_size: the side of the person crops (the evaluation's ``attackers.crop_size``).
        batch_size: identities per step.
        lr: the learning rate.
        encoder_steps: training steps.
        temperature: the InfoNCE temperature.
        decoded_views: share of second photos encoded and decoded by the base's VAE.
        threads: CPU threads (0: torch's default).
    """

    base: str = "preset:mini"
    seed: int = 0
    first_scene_seed: int = 5_000_000
    resolution: int = 64
    num_identities: int = 12000
    crop_size: int = 48
    batch_size: int = 128
    lr: float = 2e-3
    encoder_steps: int = 3000
    temperature: float = 0.1
    decoded_views: float = 0.5
    threads: int = 0


def person_pairs(cfg: PersonBuildConfig, rng: np.random.Generator) -> np.ndarray:
    """``[I, 2, crop, crop, 3]`` uint8: two extent crops of each fresh identity: one in a scene of the world (with the
    scene's other people around it), one in another photo of it (:func:`draw_other_view`).

    Args:
        cfg: the recipe.
        rng: random numbers.
    """
    schema = face_schema()
    scenes = np.zeros((cfg.num_identities, 2, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    boxes = np.zeros((cfg.num_identities, 2, 4))
    for i in range(cfg.num_identities):
        image, persons, appearances = draw_scene_identities(cfg.first_scene_seed + i, schema, cfg.resolution)
        which = int(rng.integers(len(persons)))
        scenes[i, 0], boxes[i, 0] = np.asarray(image), persons[which]["box"]
        image, placed = draw_other_view(persons[which], appearances[which], rng, schema, cfg.resolution)
        scenes[i, 1], boxes[i, 1] = np.asarray(image), placed["box"]
    decoded = np.flatnonzero(rng.random(cfg.num_identities) < cfg.decoded_views)
    scenes[decoded, 1] = vae_round_trip(cfg.base, scenes[decoded, 1])
    crops = np.zeros((cfg.num_identities, 2, cfg.crop_size, cfg.crop_size, 3), dtype=np.uint8)
    for i in range(cfg.num_identities):
        for v in range(2):
            photo = degrade(Image.fromarray(scenes[i, v]), rng, colour=False)
            crops[i, v] = np.asarray(person_crop(photo, boxes[i, v], cfg.crop_size, DEFAULT_EXTENT)[0])
    return crops


def build_person_features(folder: Path, cfg: PersonBuildConfig, log: Log = print) -> dict:
    """Train the encoder and write it (:class:`SceneFeatures` layout) with ``build.json`` into ``folder``.

    Args:
        folder: the output folder.
        cfg: the recipe.
        log: where progress lines go.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 11)
    crops = torch.from_numpy(person_pairs(cfg, rng)).permute(0, 1, 4, 2, 3)  # [I, 2, 3, crop, crop]
    log(f"drew {len(crops)} identities, two photos each")
    model = SceneFeatures(num_features=96, width=64, embedding=128).train().requires_grad_(True)
    g = torch.Generator().manual_seed(cfg.seed + 11)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randperm(len(crops), generator=g)[: cfg.batch_size]
        flip = torch.rand(len(index), generator=g) < 0.5  # a person seen from its mirror side is still itself
        pairs = crops[index]
        pairs[flip] = pairs[flip].flip(-1)
        a = F.normalize(model(pairs[:, 0]), dim=-1)
        b = F.normalize(model(pairs[:, 1]), dim=-1)
        return symmetric_info_nce(a @ b.T / cfg.temperature)

    _, loss = _train(model, cfg.encoder_steps, cfg.lr, loss_fn, log, "person encoder")
    model.requires_grad_(False).eval().save_pretrained(folder)
    with torch.no_grad():  # held-out check: fresh identities, rank-1 of one photo against the other
        held_out = torch.from_numpy(
            person_pairs(
                PersonBuildConfig(
                    **{**asdict(cfg), "num_identities": 200, "first_scene_seed": cfg.first_scene_seed - 200}
                ),
                np.random.default_rng(cfg.seed + 12),
            )
        ).permute(0, 1, 4, 2, 3)
        a, b = (F.normalize(model(held_out[:, v]), dim=-1) for v in range(2))
        rank1 = float(((a @ b.T).argmax(1) == torch.arange(len(a))).float().mean())
    metrics = {"config": asdict(cfg), "encoder_loss": loss, "held_out": {"identities": 200, "rank1_other_view": rank1}}
    (folder / "build.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    log(f"person encoder on 200 held-out identities: rank-1 (other photo) {rank1:.3f}")
    return metrics
