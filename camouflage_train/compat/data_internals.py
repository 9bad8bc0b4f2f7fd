"""The ``datasets`` and OmegaConf internals the project uses."""

from __future__ import annotations

from collections.abc import Mapping
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


def shard_store(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """litdata's client of the object store behind ``url`` (``litdata.streaming.fs_provider._get_fs_provider``: its
    ``upload_file(local, remote)`` / ``download_file(remote, local)`` / ``exists(remote)`` reach S3, GCS and Azure with
    the same ``storage_options`` litdata's datasets take).

    Args:
        url: an object-store URI (``s3://bucket/prefix``).
        storage_options: the store's options (endpoint, credentials).
    """
    from litdata.streaming.fs_provider import _get_fs_provider

    return _get_fs_provider(url, dict(storage_options or {}))
