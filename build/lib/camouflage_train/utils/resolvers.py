"""OmegaConf resolvers used by the configs (registered when the package is imported)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _tiny_face_pack(cache_dir: str) -> str:
    from camouflage_train.annotation.tiny_models import build_tiny_face_pack

    return str(build_tiny_face_pack(Path(cache_dir) / "faces-tiny-v1"))


def register() -> None:
    if not OmegaConf.has_resolver("tiny_face_pack"):
        OmegaConf.register_new_resolver("tiny_face_pack", _tiny_face_pack)
