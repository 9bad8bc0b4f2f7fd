"""OmegaConf resolvers the configs use; :func:`register_resolvers` runs when an entry point starts.

``${run_stamp:}``: the run folder's name, ``<date>_<time>_<token>``. Hydra's ``${now:...}`` alone has one-second
resolution, so W&B sweep agents (or SLURM array tasks) started in the same second shared one run folder and
``ckpt_path=auto`` resumed one run from another's checkpoint. The token is the W&B run id when a sweep agent
started the run (the folder then names its W&B run), else random; it is drawn once per process.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime
from functools import cache

from omegaconf import OmegaConf


@cache
def run_stamp() -> str:
    """``YYYY-mm-dd_HH-MM-SS_<token>``, the same for every call in one process."""
    token = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(3)
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{token}"


def register_resolvers() -> None:
    """Register the project's resolvers (idempotent)."""
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp)
