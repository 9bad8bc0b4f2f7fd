"""``evaluate.py``: build the rows (the anonymizers named in ``rows``, from ``anonymizers``) and the metrics from
config, run ``trainer.test`` and return the results table (also written to the run folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from camouflage_train.data.identities import read_identities
from camouflage_train.data.sources import check_sidecars
from camouflage_train.metrics.clip import ClipScorer
from camouflage_train.metrics.faces import FaceAnalyzer
from camouflage_train.metrics.privacy_utility import SWEEP_SEPARATOR
from camouflage_train.modules.evaluation_module import JointEvaluationModule
from camouflage_train.pipelines.light import check_checkpoint_base
from camouflage_train.pipelines.stand_ins import find_stand_ins, warn_stand_ins
from camouflage_train.utils.config_checks import ConfigError, validate_config
from camouflage_train.utils.instantiators import instantiate_group, instantiate_named
from camouflage_train.utils.paths import check_input_paths


@dataclass
class EvaluateConfig:
    """The top-level keys of ``configs/evaluate.yaml`` (``evaluate.py``).

    Args:
        rows: the anonymizers to evaluate, by name, in table order.
        anonymizers: name -> anonymizer config (``configs/anonymize/model/``).
        row_sweep: one or several ``{row, key, name, values}`` sweeps (see :func:`expand_sweep`).
        seed: image seeds derive from it and the image names.
        light_checkpoint: the Light checkpoint the ``light`` rows load.
        grid_batches: batches whose sample grids are saved.
        metrics: the metric settings (CLIP, FID, bootstrap).
        trainer: the Lightning trainer config.
        task_name: the run folder's name under ``logs/``.
        attributes: the attribute schema group.
        data: the data group (its validation split is evaluated).
        faces: the face pack (detection, gender, age).
        recognisers: the re-identification recognisers.
        attackers: the re-identification attackers (``configs/attackers/``; ``None``: the face recognisers only).
        other_views: other photos of each evaluated person, for the other-view protocol
            (:mod:`camouflage_train.data.identities`; ``None``: the same-image protocol only).
        logger: the loggers group.
        paths: the paths group.
    """

    rows: list
    anonymizers: Any
    row_sweep: Any = None
    seed: int = 0
    light_checkpoint: str | None = None
    grid_batches: int = 2
    metrics: Any = None
    trainer: Any = None
    task_name: str = "evaluate"
    attributes: Any = None
    data: Any = None
    faces: Any = None
    recognisers: Any = None
    attackers: Any = None
    other_views: Any = None
    logger: Any = None
    paths: Any = None


def expand_sweep(cfg: DictConfig) -> None:
    """Replace each swept row in ``rows`` by one row per value of its setting (``<row>@<name>=<v>``), each a copy of
    that anonymizer with the value set: same images, seeds and metrics for every value.

    ``row_sweep`` is one sweep ``{row, key, name, values}`` or a list of them (one per row, e.g. Base's guidance
    and Light's classifier-free guidance, drawn as two curves).

    Args:
        cfg: the composed evaluate config (changed in place).
    """
    specs = cfg.get("row_sweep")
    if not specs:
        return
    specs = [specs] if isinstance(specs, DictConfig) else list(specs)
    swept = [spec.get("row") for spec in specs]
    if len(set(swept)) != len(swept):
        raise ConfigError(f"row_sweep: each row can be swept once, got rows {swept}")
    for index, spec in enumerate(specs):
        _expand_one(cfg, spec, "row_sweep" if len(specs) == 1 else f"row_sweep[{index}]")


def _expand_one(cfg: DictConfig, spec: DictConfig, where: str) -> None:
    row, key, values = spec.get("row"), spec.get("key"), list(spec.get("values") or [])
    name = spec.get("name") or str(key).rsplit(".", 1)[-1]
    if row not in cfg.rows:
        raise ConfigError(
            f"{where}.row: '{row}' is not one of rows {list(cfg.rows)}: add it to rows, or pass row_sweep=null"
        )
    if not values:
        raise ConfigError(f"{where}.values: give at least one value")
    if OmegaConf.select(cfg.anonymizers[row], str(key), default=_ABSENT) is _ABSENT:
        raise ConfigError(f"{where}.key: anonymizers.{row} has no setting '{key}'")
    rows = []
    with open_dict(cfg):
        for current in cfg.rows:
            if current != row:
                rows.append(current)
                continue
            for value in values:
                label = f"{row}{SWEEP_SEPARATOR}{name}={value}"
                cfg.anonymizers[label] = cfg.anonymizers[row]  # a copy, interpolations intact
                OmegaConf.update(cfg.anonymizers[label], str(key), value, merge=False)
                rows.append(label)
        cfg.rows = rows


_ABSENT = object()


def run_evaluation(cfg: DictConfig) -> list[dict[str, Any]]:
    """``evaluate.py``: check the config and inputs, build the anonymizers and metrics, run every row on the validation
    split, write ``results.{md,csv,json}``, the grids and the plot; return the results rows.

    Args:
        cfg: the composed ``configs/evaluate.yaml``.
    """
    validate_config(cfg, EvaluateConfig)
    expand_sweep(cfg)
    with_checkpoint = [row for row in cfg.rows if "checkpoint" in cfg.anonymizers.get(row, {})]
    unset = [row for row in with_checkpoint if not cfg.anonymizers[row].checkpoint]
    if unset:
        kept = [row for row in cfg.rows if row not in unset]
        raise ConfigError(
            f"rows has {unset}, which need a training checkpoint: pass light_checkpoint=<training checkpoint>, "
            f"or drop them: rows=[{','.join(kept)}]"
        )
    checkpoints = {
        "light_checkpoint" if path == cfg.light_checkpoint else f"anonymizers.{row}.checkpoint": (path, row)
        for row in with_checkpoint
        for path in [cfg.anonymizers[row].checkpoint]
    }
    check_input_paths({key: (path, "file") for key, (path, _) in checkpoints.items()})
    for key, (path, row) in checkpoints.items():  # Light training checkpoints, before any data or model is loaded
        if str(cfg.anonymizers[row].get("_target_", "")).endswith("build_light"):
            check_checkpoint_base(path, cfg.anonymizers[row].get("base_model"), key=key, attributes=cfg.attributes)
    # Evaluation reads only the validation images: with a val_source the training split is never loaded.
    sources = ["val_source"] if cfg.data.get("val_source") else ["train_source"]
    check_sidecars(cfg.data, sources)
    if cfg.get("other_views") and cfg.other_views.get("identities"):  # the identity sidecar, before any image loads
        read_identities(cfg.other_views.identities)
    datamodule = instantiate(cfg.data, train_source=None) if cfg.data.get("val_source") else instantiate(cfg.data)
    L.seed_everything(cfg.seed, workers=True)
    methods: dict[str, Any] = {}  # one entry per anonymizer: the rows of a sweep (base@guidance=0.4, ...) share models
    for row in cfg.rows:
        methods.setdefault(row.split(SWEEP_SEPARATOR)[0], cfg.anonymizers[row])
    stand_ins = find_stand_ins(
        {
            "anonymizers": methods,
            "faces": cfg.faces,
            "recognisers": cfg.recognisers,
            "metrics": cfg.metrics,
            "attackers": cfg.get("attackers"),
        }
    )
    warn_stand_ins(stand_ins)
    anonymizers = instantiate_named(cfg.anonymizers, list(cfg.rows), "rows")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    faces = FaceAnalyzer(instantiate(cfg.faces), instantiate(cfg.recognisers))
    feature = cfg.metrics.fid.feature
    fid_feature = instantiate(feature) if isinstance(feature, DictConfig) else int(feature)
    attacks = None
    if cfg.get("attackers"):
        other_views = instantiate(cfg.other_views, _convert_="all") if cfg.get("other_views") else None
        attacks = instantiate(cfg.attackers, other_views=other_views, _convert_="all")
    module = JointEvaluationModule(
        anonymizers,
        faces,
        ClipScorer(**cfg.metrics.clip),
        fid_feature,
        cfg.metrics.fid.kid_subset_size,
        str(output_dir),
        cfg.grid_batches,
        cfg.seed,
        attacks,
    )
    trainer = instantiate(cfg.trainer, logger=instantiate_group(cfg.get("logger")))
    trainer.test(module, datamodule=datamodule)
    if trainer.is_global_zero:
        flag_stand_ins(stand_ins, output_dir)
    return module.results


def flag_stand_ins(stand_ins: dict[str, str], output_dir: Path) -> None:
    """``stand_ins.json`` next to the results, and a note under ``results.md``'s table naming each stand-in
    (no file and no note when there is none).

    Args:
        stand_ins: :func:`~camouflage_train.pipelines.stand_ins.find_stand_ins`'s result.
        output_dir: the run folder.
    """
    if not stand_ins:
        return
    (output_dir / "stand_ins.json").write_text(json.dumps(stand_ins, indent=2))
    with (output_dir / "results.md").open("a") as handle:
        handle.write(
            "\nStand-ins (random test weights, or models of the synthetic mini world): the measures that use them "
            "say nothing about real photographs.\n"
        )
        handle.writelines(f"- `{key}`: {kind}\n" for key, kind in stand_ins.items())
