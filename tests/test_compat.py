"""The library internals of :mod:`camouflage_train.compat`: each is still in the installed version and does what
the project relies on, and every ``# Copied from`` marker matches the installed library's source."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version

import torch
from diffusers import UNet2DConditionModel

from camouflage_train.compat.copies import copied_from_problems, find_markers
from camouflage_train.compat.data_internals import dataset_fingerprint, raw_value
from camouflage_train.compat.diffusers_internals import (
    execution_device,
    load_ip_adapter_weights,
    repeated_block_names,
)
from camouflage_train.compat.lightning_internals import ContinuingExperimentWriter, ResumableCSVLogger
from tests.conftest import REPO


def test_every_copied_from_marker_matches_the_installed_source():
    markers = find_markers()
    assert any(m.file.name == "person_attention.py" and m.target.endswith("IPAdapterAttnProcessor2_0.__call__")
               for m in markers), markers  # fmt: skip
    assert copied_from_problems() == []


def test_a_changed_or_missing_upstream_source_is_reported(tmp_path):
    (tmp_path / "adapted.py").write_text(
        "# Copied from diffusers.models.attention_processor.IPAdapterAttnProcessor2_0.__call__\n"
        "# (diffusers 0.1.0, source sha256 0123456789abcdef): an old copy\n"
        "def f(): ...\n\n"
        "    # Copied from diffusers.no_such_module.Thing\n"
        "    # (diffusers 0.42.1, source sha256 0123456789abcdef): gone\n"
    )
    changed, missing = copied_from_problems(tmp_path)
    assert "adapted.py:1" in changed and "changed upstream" in changed and "update the marker" in changed
    assert "adapted.py:5" in missing and "not in the installed diffusers" in missing


def test_diffusers_internals(tiny_model_dir):
    """Each wrapper against the installed diffusers; the pin in pyproject keeps a user on the tested minor version."""
    from camouflage_train.models.backbone import load_frozen_backbone
    from camouflage_train.models.ip_adapter import AdapterConfig, adapter_modules, initial_state_dict
    from camouflage_train.pipelines.light import build_pipeline

    pin = re.search(r'"diffusers>=([\d.]+),<([\d.]+)"', (REPO / "pyproject.toml").read_text())
    installed = tuple(int(v) for v in version("diffusers").split(".")[:2])
    low, high = (tuple(int(v) for v in bound.split(".")[:2]) for bound in pin.groups())
    assert low <= installed < high, f"diffusers {version('diffusers')} is outside the tested range {pin.groups()}"

    assert "BasicTransformerBlock" in repeated_block_names(UNet2DConditionModel)
    assert repeated_block_names(torch.nn.Linear(2, 2)) == ()

    loader = inspect.signature(UNet2DConditionModel._load_ip_adapter_weights)
    assert list(loader.parameters)[:3] == ["self", "state_dicts", "low_cpu_mem_usage"]
    backbone = load_frozen_backbone(str(tiny_model_dir))
    load_ip_adapter_weights(backbone.unet, initial_state_dict(backbone.unet, AdapterConfig(embed_dim=16)))
    assert len(adapter_modules(backbone.unet)) > 1  # the projection and one processor per cross-attention layer

    pipe = build_pipeline(backbone.vae, backbone.text_encoder, backbone.tokenizer, backbone.unet,
                          backbone.noise_scheduler.config)  # fmt: skip
    assert execution_device(pipe) == torch.device("cpu")


def test_lightning_csv_writer_hooks(tmp_path):
    """The writer's private hooks are still called as the continuing writer expects: an existing metrics.csv is
    continued from the first newly logged step, not deleted."""
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    constructors = [inspect.getsource(c.__init__) for c in ExperimentWriter.__mro__[:-1] if "__init__" in vars(c)]
    assert any("self._check_log_dir_exists()" in source for source in constructors)
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="run", version=0)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.log_metrics({"loss": 0.5}, step=1)
    logger.save()
    again = ResumableCSVLogger(save_dir=str(tmp_path), name="run", version=0)
    assert isinstance(again.experiment, ContinuingExperimentWriter)
    again.log_metrics({"loss": 0.7}, step=1)  # the resumed run logs step 1 again
    again.save()
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["loss", "step"] and [r.split(",")[1] for r in rows[1:]] == ["0", "1"]
    assert rows[2].startswith("0.7")


def test_data_internals():
    import datasets
    from omegaconf import OmegaConf

    rows = datasets.Dataset.from_dict({"x": [1, 2, 3]})
    first = dataset_fingerprint(rows)
    assert isinstance(first, str) and first == dataset_fingerprint(rows)
    assert dataset_fingerprint(rows.map(lambda r: {"x": r["x"] + 1})) != first

    cfg = OmegaConf.create({"token": "${oc.env:SOME_TOKEN}", "empty": None})
    assert raw_value(cfg, "token") == "${oc.env:SOME_TOKEN}" and raw_value(cfg, "empty") is None
