"""The ``datasets`` and OmegaConf internals the project uses."""

from __future__ import annotations

from typing import Any


def dataset_fingerprint(dataset: Any) -> str:
    """A ``datasets.Dataset``'s content fingerprint (``Dataset._fingerprint``: the hash ``datasets`` itself keys its
    cache on; it changes with the data and every transform applied).

    Args:
        dataset: a ``datasets.Dataset``.
    """
    return dataset._fingerprint


def raw_value(node: Any, key: str) -> Any:
    """The value written for ``key`` in an OmegaConf ``DictConfig``, without resolving interpolations
    (``DictConfig._get_node(key)._value()``): a key set to ``${oc.env:...}`` reads as that string, not the secret.

    Args:
        node: a ``DictConfig``.
        key: one of its keys.
    """
    return node._get_node(key)._value()
