"""The miniature world: a small Stable Diffusion and an insightface-format face pack, *trained* on the synthetic
scenes of :mod:`camouflage_train.data.synthetic`, so that the paper's claims can be measured offline on a CPU.

Built by one seeded command (``python -m camouflage_train.miniworld.build``); the result is committed under
``camouflage_train/miniworld/weights`` and loaded as ``preset:mini`` (base), ``faces=mini`` and ``recognisers=mini``.
"""

from __future__ import annotations

from camouflage_train.models.presets import MINI_BUILD_COMMAND as BUILD_COMMAND
from camouflage_train.models.presets import MINI_WEIGHTS as WEIGHTS
from camouflage_train.models.presets import mini_weights_folder as weights_folder

__all__ = [
    "BUILD_COMMAND",
    "WEIGHTS",
    "mini_face_pack",
    "mini_person_features",
    "mini_scene_features",
    "weights_folder",
]


def mini_face_pack(file: str | None = None) -> str:
    """The trained mini face pack's folder, or ``file`` in it: behind ``faces=mini`` and ``recognisers=mini``.

    Args:
        file: a file of the pack (``None``: the folder).
    """
    folder = weights_folder("faces")
    return str(folder / file if file else folder)


def mini_scene_features():  # -> SceneFeatures (imported lazily: torch)
    """The FID/KID feature extractor trained in the miniature world (``metrics.fid.feature`` of ``eval_demo``)."""
    from camouflage_train.stand_ins.scene_features import SceneFeatures

    return SceneFeatures.from_pretrained(weights_folder("features"))


def mini_person_features():  # -> SceneFeatures (imported lazily: torch)
    """The person encoder trained in the miniature world (the ``context`` attacker of ``attackers=mini``)."""
    from camouflage_train.stand_ins.scene_features import SceneFeatures

    return SceneFeatures.from_pretrained(weights_folder("person"))
