"""Check a composed config before anything is built: unknown keys, wrong types, secrets.

Hydra merges config files without a schema, so a typo in an experiment file (``model.adapter.tokens_per_persn``)
or a wrong type (``data.batch_size: eight``) would otherwise be ignored or fail deep inside a constructor.
Every node with a ``_target_`` is checked against its target's signature (unknown keys unless it takes
``**kwargs``; simple annotated types), parameters annotated with a dataclass (``model.adapter`` ->
:class:`~camouflage_train.models.ip_adapter.AdapterConfig`) against its fields, and keys named like secrets
are refused: tokens and API keys are read from the environment (``WANDB_API_KEY``, ``HF_TOKEN``), never from
configs, which are saved with every run. An entry point's own top-level keys (``export.py``'s ``checkpoint``,
``anonymize.py``'s ``resolution``, ...) are checked against its settings dataclass, nested dataclasses included.
Errors name the key and the file (or command-line override) that set it, and suggest the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from camouflage_train.compat.data_internals import raw_value
from camouflage_train.errors import UserError

_SPECIAL_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
_SECRET = re.compile(r"(^|_)(api_?key|token|password|secret)$", re.IGNORECASE)


class ConfigError(UserError, ValueError):
    """A config value is unknown, of the wrong type, or a secret; the message names key and source."""


def walk_config(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every node of a config (``DictConfig``/``ListConfig`` or plain dicts and lists) with its dotted path, the
    node itself first; values that do not resolve here (missing, env) are skipped.

    Args:
        node: the config or one of its nodes.
        path: the node's own path.
    """
    yield path, node
    if isinstance(node, DictConfig | Mapping):
        items = [(str(key), key) for key in node]
    elif isinstance(node, ListConfig | list):
        items = [(f"[{index}]", index) for index in range(len(node))]
    else:
        return
    for name, key in items:
        try:
            value = node[key]
        except Exception:
            continue
        yield from walk_config(
            value, name if not path else f"{path}{name}" if name.startswith("[") else f"{path}.{name}"
        )


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (a config leaf or container) can be passed for ``annotation``; unknown types pass."""
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, typing.TypeVar):
        return True
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # an object built by Hydra: its own node is checked separately
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if value is None:
        return annotation is type(None)
    base = origin or annotation
    if not isinstance(base, type):
        return True
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    if issubclass(base, Path):
        return isinstance(value, str | Path)
    if issubclass(base, Mapping) or base is dict or dataclasses.is_dataclass(base):
        return isinstance(value, DictConfig | dict)
    if base in (list, tuple) or (issubclass(base, Sequence) and base is not str):
        return isinstance(value, ListConfig | list | tuple)
    return True


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Parameters, evaluated annotations and whether it accepts ``**kwargs``."""
    function = target.__init__ if inspect.isclass(target) else target
    parameters = dict(inspect.signature(function).parameters)
    parameters.pop("self", None)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # forward references the target module cannot resolve: skip type checks
        hints = {}
    variadic = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return parameters, hints, variadic


def _field_problems(
    node: DictConfig,
    accepted: Collection[str],
    hints: Mapping[str, Any],
    variadic: bool,
    owner: str,
    path: str,
) -> Iterator[tuple[str, str]]:
    """Unknown keys and wrong types of ``node`` against ``accepted`` names with ``hints``; recurses into
    fields annotated with a dataclass (alone or in a union, e.g. ``AdapterConfig | Mapping``)."""
    for key in node:
        if key in _SPECIAL_KEYS:
            continue
        where = f"{path}.{key}" if path else str(key)
        if key not in accepted:
            if not variadic:
                yield where, unknown_key_message(str(key), accepted, owner)
            continue
        try:
            value = node[key]
        except Exception:
            continue
        # null means "not set here", except for a Literal: its choices are all the values it takes
        checked = value is not None or typing.get_origin(hints.get(key)) is typing.Literal
        if checked and key in hints and not _matches(value, hints[key]):
            yield where, f"{value!r} is not a valid {_type_name(hints[key])} for {owner}"
        schema = _dataclass_in(hints.get(key))
        if schema is not None and isinstance(value, DictConfig):
            yield from _dataclass_problems(value, schema, where)


def _dataclass_problems(node: DictConfig, schema: type, path: str) -> Iterator[tuple[str, str]]:
    """Unknown keys and wrong types of ``node`` against the fields of the dataclass ``schema``."""
    fields = [f.name for f in dataclasses.fields(schema)]
    yield from _field_problems(node, fields, typing.get_type_hints(schema), False, schema.__name__, path)


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass whose fields a config mapping for ``annotation`` must use: the annotation itself, or one
    member of a union (``AdapterConfig | Mapping``) unless that class reads another form (``from_config``)."""
    if dataclasses.is_dataclass(annotation):
        return annotation  # type: ignore[return-value]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return next((a for a in members if not hasattr(a, "from_config")), None)
    return None


def unknown_key_message(key: str, accepted: Collection[str], owner: str) -> str:
    """``unknown key for <owner>``, the closest accepted name when one is close, and every accepted name.

    Args:
        key: the unknown key.
        accepted: the keys accepted there.
        owner: what the keys belong to, for the message.
    """
    close = difflib.get_close_matches(key, list(accepted), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key for {owner}{hint} (accepted: {', '.join(sorted(accepted))})"


def _problems(cfg: DictConfig, settings: type | None) -> Iterator[tuple[str, str]]:
    if settings is not None:
        yield from _dataclass_problems(cfg, settings, "")
    for path, node in walk_config(cfg):
        if not isinstance(node, DictConfig):
            continue
        for key in node:
            if not path.startswith("hydra") and OmegaConf.is_missing(node, key):
                yield f"{path}.{key}" if path else str(key), "required, but not set (???): pass it as key=value"
        for key in node:
            if isinstance(key, str) and _SECRET.search(key) and raw_value(node, key) is not None:
                yield (
                    f"{path}.{key}" if path else key,
                    "looks like a secret: configs are saved with every run, so tokens and API keys are read "
                    "from the environment only (WANDB_API_KEY, HF_TOKEN, ...); remove this key",
                )
        if "_target_" not in node or path.startswith("hydra"):
            continue
        try:
            target = get_object(str(node._target_))
        except Exception as error:
            yield f"{path}._target_", f"cannot import '{node._target_}' ({error})"
            continue
        parameters, hints, variadic = _signature(target)
        owner = f"{target.__module__}.{target.__qualname__}"
        yield from _field_problems(node, parameters, hints, variadic, owner, path)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:  # the choices, as a user writes them
        return "choice (one of " + " | ".join(str(choice) for choice in typing.get_args(annotation)) + ")"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _config_files() -> list[tuple[Path, str]]:
    """``(file, package)`` of every config file this run composed, in merge order (needs a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    roots = [
        Path(source.path)
        for source in hydra_cfg.runtime.config_sources
        if source.schema == "file" and Path(source.path).is_dir()
    ]
    files: list[tuple[Path, str]] = []
    primary = str(hydra_cfg.job.config_name).removesuffix(".yaml")
    for group, option in [(None, primary), *hydra_cfg.runtime.choices.items()]:
        if option is None or (group or "").startswith("hydra"):
            continue
        relative = Path(*(group.split("/") if group else []), f"{option}.yaml")
        for root in roots:
            if (root / relative).is_file():
                text = (root / relative).read_text()
                package = "" if "# @package _global_" in text or group is None else group.replace("/", ".")
                files.append((root / relative, package))
                break
    # Experiment files are merged last.
    return sorted(files, key=lambda item: item[0].parent.name == "experiment")


def _source_of(key: str, files: list[tuple[Path, dict[str, Any], str]]) -> str:
    """The command-line override or the last of ``files`` (path, parsed YAML, package) that sets ``key``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        for override in HydraConfig.get().overrides.task:
            if override.lstrip("+~").split("=", 1)[0] == key:
                return f"command-line override '{override}'"
    source = "the composed config"
    for file, data, package in files:
        relative = key.removeprefix(f"{package}.") if package else key
        if package and not key.startswith(f"{package}."):
            continue
        node: Any = data
        for part in relative.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            source = str(file)
    return source


def validate_config(cfg: DictConfig, settings: type | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem as ``<source>: <key>: <why>``.

    ``settings``: the entry point's dataclass of top-level keys (config groups are fields typed ``Any``).

    Args:
        cfg: the composed config.
        settings: the dataclass of its top-level keys (``None``: only the groups are checked).
    """
    found = list(_problems(cfg, settings))
    if not found:
        return
    files = [(file, yaml.safe_load(file.read_text()) or {}, package) for file, package in _config_files()]
    problems = [f"{_source_of(key, files)}: {key}: {why}" for key, why in found]
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
