"""Every use of a library internal, in one place.

The project leans on a few names that diffusers, Lightning, ``datasets`` and OmegaConf do not document as public
(a leading underscore, or a private hook that a subclass overrides). Each is wrapped here, once, so that an
upgrade of one of those libraries touches this package only, and ``tests/test_compat.py`` fails, naming the
internal, when an installed version no longer has it:

* :mod:`~camouflage_train.compat.diffusers_internals`: a pipeline's execution device, the UNet-level IP-Adapter
  loader, the UNet's repeated blocks (regional compilation).
* :mod:`~camouflage_train.compat.lightning_internals`: the CSV experiment writer's private hooks (a metrics file
  that a resumed run continues).
* :mod:`~camouflage_train.compat.data_internals`: a ``datasets.Dataset``'s fingerprint, an OmegaConf node's raw
  value.

Code adapted from a library carries a ``# Copied from <dotted name> (<library> <version>, source sha256
<16 hex digits>)`` marker; :func:`~camouflage_train.compat.copies.copied_from_problems` compares each with the
installed library's source, so an upstream change cannot go unseen.

Nothing here imports from the rest of the package: every layer may use it.
"""
