"""What every command-line entry point (train, evaluate, export, annotate, anonymize) does around its task.

* :func:`run_task`: a :class:`~camouflage_train.errors.UserError` (bad config value, missing file, unusable
  data) is printed as one short message and the process exits with status 2, without a Python traceback;
  ``HYDRA_FULL_ERROR=1`` re-raises it with the traceback. In a multirun the error is re-raised, so Hydra
  records the failed job and the sweep goes on.
* :func:`main_with_key_help`: an override of a key that does not exist (``model.adapter.tokens_per_persn=2``)
  stops the run before Hydra starts it, with the valid keys at that place and the closest one, and exit
  status 2 (Hydra alone would exit 1 advising ``+key=value``, which adds the typo as a new key).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

from camouflage_train.errors import user_error_in
from camouflage_train.utils.config_checks import unknown_key_message
from camouflage_train.utils.resolvers import register_resolvers

log = logging.getLogger(__name__)
register_resolvers()  # before @hydra.main composes the config
T = TypeVar("T")


def run_task(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run ``task(cfg)``; a user error becomes a short message on stderr and exit status 2.

    Args:
        task: the entry point's function.
        cfg: its composed config.
    """
    try:
        return task(cfg)
    except Exception as error:
        found = user_error_in(error)
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or _multirun():
            raise
        _log_to_files(f"{type(found).__name__}: {found}")
        print(f"error: {found}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def _log_to_files(message: str) -> None:
    """Record the error in the run's log file (Hydra's file handler) without printing it a second time."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main_with_key_help(
    main: Callable[[], Any], config_dir: str | Path, config_name: str, retired: Mapping[str, str] | None = None
) -> None:
    """Call a ``@hydra.main`` function, unless an override names a key the config does not have: then say
    which, with the valid keys there and the closest one (or, for a key of an earlier version, what replaced it),
    and exit with status 2.

    Args:
        main: the ``@hydra.main`` function.
        config_dir: its config folder.
        config_name: its config file.
        retired: keys of earlier versions -> what replaced them.
    """
    replaced = retired_override_keys(sys.argv[1:], retired or {})
    unknown = replaced or unknown_override_keys(config_dir, config_name, sys.argv[1:])
    if unknown:
        print("error: " + "\n       ".join(unknown), file=sys.stderr)
        if not replaced:
            print("(to add a key the config does not have on purpose, write +key=value)", file=sys.stderr)
        raise SystemExit(2)
    main()


def retired_override_keys(arguments: list[str], retired: Mapping[str, str]) -> list[str]:
    """One line per override (``key=value``, ``+key=value``) of a retired key, with what replaced it.

    Args:
        arguments: the command line's overrides.
        retired: keys of earlier versions -> what replaced them.
    """
    lines = []
    for argument in arguments:
        key = argument.lstrip("+~").split("=", 1)[0]
        if not argument.startswith("-") and key in retired:
            lines.append(f"'{argument}': {key} is {retired[key]}")
    return lines


def unknown_override_keys(config_dir: str | Path, config_name: str, arguments: list[str]) -> list[str]:
    """One line per ``key=value`` override (no ``+``/``~``) whose key the composed config does not have.

    Args:
        config_dir: the config folder.
        config_name: the config file.
        arguments: the command line's overrides.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith(("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")) for a in arguments):
        return []  # another primary config than the one checked here: Hydra reports its own errors
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in arguments if not a.startswith("-")])
    except Exception:  # a syntax error: Hydra's message says it all
        return []
    if any(o.is_sweep_override() for o in overrides):
        return []  # a sweep's keys exist in some of its configs only: each job's composition reports its own
    try:
        return _unknown_keys(config_dir, config_name, overrides)
    except Exception:  # a config that does not compose here (an interpolation of Hydra's run): leave it to Hydra
        return []


def _unknown_keys(config_dir: str | Path, config_name: str, overrides: list[Any]) -> list[str]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # Group choices and top-level values compose the config whose keys the other overrides must exist in (with
    # Hydra's own overrides, such as hydra.searchpath, in every trial); a top-level value that does not compose is
    # itself checked below. A group choice that does not compose is Hydra's to report (it lists the options).
    groups = {path.name for path in Path(config_dir).iterdir() if path.is_dir()}
    hydra_own = [o.input_line for o in overrides if o.key_or_group.split(".")[0].split("/")[0] == "hydra"]
    plain = [
        o
        for o in overrides
        if not (o.is_add() or o.is_force_add() or o.is_delete())
        and "." not in o.key_or_group
        and o.input_line not in hydra_own
    ]
    GlobalHydra.instance().clear()
    composed, applied = None, list(hydra_own)
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        for candidate in [None, *plain]:
            trial = applied + ([candidate.input_line] if candidate is not None else [])
            try:
                composed = compose(config_name, overrides=trial)
            except Exception:
                continue
            applied = trial
    failed = [o for o in plain if o.input_line not in applied]
    if composed is None or any("/" in o.key_or_group or o.key_or_group in composed for o in failed):
        return []  # a group choice (or a value) that does not compose: Hydra's own message names it
    lines = []
    for override in overrides:
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or override.is_delete() or override.input_line in applied:
            continue
        if "/" in key or "@" in key or key in groups:  # a group choice that did not compose: Hydra lists the options
            continue
        *parents, leaf = override.key_or_group.split(".")
        node: Any = composed
        for part in parents:
            node = node.get(part) if isinstance(node, DictConfig) else None
        if isinstance(node, DictConfig) and leaf not in list(node.keys()):  # `in node` is False for a ??? value
            keys = [str(k) for k in node if not str(k).startswith("_")]
            where = ".".join(parents) or "the top level"
            lines.append(f"'{override.key_or_group}': {unknown_key_message(leaf, keys, where)}")
    return lines
