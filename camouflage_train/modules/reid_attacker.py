"""The adaptive attacker: a re-identifier trained on the anonymizer's own outputs.

A frozen attacker looks for what real photos of one person share; an attacker who holds the anonymizer (it is
published) trains on its outputs and learns what survives it (Lorenz et al. 2025). Here the attacker learns how much to
trust each thing it reads of a person (:mod:`camouflage_train.metrics.attacks`: the whole crop, the crop with the face
hidden, the colours around the face): one weight per part on its cosine similarity, trained with a symmetric InfoNCE on
(anonymized person, gallery photo of the same identity) pairs. It starts at the whole-crop ``context`` attacker (weight
1 on it, 0 on the rest), so it begins where the frozen attacker is and moves only where the training identities say
the anonymizer leaves another part. A handful of weights is what ~75 training identities can fit: larger heads on the
features (tried on selection scenes, docs/evaluation.md) fitted the training identities and lost on new ones.

Identities are split into folds; each fold's persons are scored by an attacker trained on the pairs of the other
folds only, so no person is ever scored by an attacker that trained on its identity, and every person is scored.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from camouflage_train.models.losses import symmetric_info_nce


@dataclass(frozen=True)
class AdaptiveAttackerConfig:
    """How the adaptive attacker trains (``attackers.adaptive``; chosen on selection scenes, docs/evaluation.md).

    Args:
        parts: the features whose cosine similarities it weighs; it starts with weight 1 on the first, 0 on the rest.
        folds: identity folds (each scored by an attacker trained on the others).
        steps: full-batch optimisation steps per attacker.
        lr: Adam's learning rate.
        temperature: InfoNCE temperature.
    """

    parts: tuple[str, ...] = ("context", "context_no_face", "appearance")
    folds: int = 2
    steps: int = 50
    lr: float = 3e-2
    temperature: float = 0.1


class AdaptiveReidModule(L.LightningModule):
    """One weight per part on its cosine similarity, trained with a symmetric InfoNCE on (anonymized person, gallery
    photo of the same identity) pairs; the batch's pairs of other identities are the negatives.

    Args:
        parts: how many parts.
        cfg: the training settings.
    """

    def __init__(self, parts: int, cfg: AdaptiveAttackerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        start = torch.zeros(parts)
        start[0] = 1.0  # the frozen whole-crop attacker
        self.weights = nn.Parameter(start)

    def scores(self, similarities: torch.Tensor) -> torch.Tensor:
        """The weighted score ``[N, G]`` of per-part cosine similarities ``[K, N, G]``.

        Args:
            similarities: per part, probes x gallery cosine similarities.
        """
        return torch.einsum("k,kng->ng", self.weights, similarities)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        probe, gallery, groups = batch  # [K, B, D] unit features per part (zero-padded to one width), [B]
        logits = self.scores(probe @ gallery.transpose(1, 2)) / self.cfg.temperature
        same = groups[:, None] == groups[None, :]  # another pair of the same identity is no negative
        logits = logits.masked_fill(same & ~torch.eye(len(groups), dtype=torch.bool, device=logits.device), -1e4)
        return symmetric_info_nce(logits)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr)

    @torch.no_grad()
    def combine(self, similarities: np.ndarray) -> np.ndarray:
        """The trained attacker's scores ``[N, G]`` from per-part similarities ``[K, N, G]`` (NaN counts as 0).

        Args:
            similarities: per part, probes x gallery-identity cosine similarities.
        """
        values = torch.as_tensor(np.nan_to_num(similarities, nan=0.0), dtype=torch.float64)
        return self.scores(values.float()).double().numpy()


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's per-fit notices (devices, tips) at warning level: one attacker is trained per row, protocol and
    fold, and the evaluation's log should not repeat them each time."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Repeat(IterableDataset):
    """One batch, ``times`` times: one epoch of full-batch steps (an epoch per step would cost a loader each)."""

    def __init__(self, batch: tuple[torch.Tensor, ...], times: int) -> None:
        self.batch, self.times = batch, times

    def __iter__(self):
        return iter([self.batch] * self.times)


def identity_folds(identities: Sequence[str], folds: int, salt: str) -> np.ndarray:
    """Each identity's fold, from a hash of the identity (stable across runs, processes and row order).

    Args:
        identities: the identities.
        folds: how many folds.
        salt: mixed into the hash (a protocol's name): folds differ between uses, never between runs.
    """
    return np.array([zlib.crc32(f"{salt}/{identity}".encode()) % folds for identity in identities], dtype=np.int64)


def train_attacker(
    probe: Sequence[np.ndarray],
    gallery: Sequence[np.ndarray],
    groups: np.ndarray,
    cfg: AdaptiveAttackerConfig,
    seed: int,
) -> AdaptiveReidModule:
    """An :class:`AdaptiveReidModule` trained on the pairs ``(probe[k][i], gallery[k][i])`` with Lightning (one CPU
    process: the features are small, and the evaluation's devices stay with the evaluation).

    Args:
        probe: per part, ``[P, D_k]`` unit features of the anonymized persons.
        gallery: per part, ``[P, D_k]`` unit features of a gallery photo of the same identity, row by row.
        groups: ``[P]`` each pair's identity (pairs of one identity are never each other's negatives).
        cfg: the training settings.
        seed: the initialisation seed (the weights start fixed; kept for heads with random starts).
    """
    width = max(part.shape[1] for part in probe)
    pad = lambda parts: torch.stack(  # noqa: E731
        [F.pad(torch.as_tensor(np.nan_to_num(p), dtype=torch.float32), (0, width - p.shape[1])) for p in parts]
    )
    # The evaluation calls this from its test loop (inference mode): the attacker's weights and data are made outside.
    # fork_rng: the loader draws its base seed from torch's global generator, which the evaluation does not lend.
    with torch.inference_mode(False), torch.enable_grad(), _quiet_lightning(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = AdaptiveReidModule(len(probe), cfg)
        batch = (pad(probe).clone(), pad(gallery).clone(), torch.as_tensor(groups, dtype=torch.long).clone())
        loader = DataLoader(_Repeat(batch, cfg.steps), batch_size=None)  # full batch: every step sees every pair
        trainer = L.Trainer(
            max_epochs=1,
            limit_train_batches=cfg.steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,  # deterministic=True would switch torch's global settings for the whole process
        )
        trainer.fit(module, loader)
    return module
