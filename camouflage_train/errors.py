"""Errors that describe a user's mistake (a config value, a path, the data), not a bug.

The command-line entry points print these as one short message and exit with status 2, without a Python
traceback (``HYDRA_FULL_ERROR=1`` shows it). Every message names the file, field or config key at fault and,
where there is one, what to do. Each class also derives from the builtin type callers would expect
(``ValueError``, ``FileNotFoundError``, ...), so library users can catch either.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: the message alone tells the user what is wrong and where."""


class InputError(UserError, FileNotFoundError):
    """An input path given in the config does not exist or is not what it must be (file / folder)."""


class DataError(UserError, ValueError):
    """The data cannot train or be processed as asked (no usable rows, too many bad rows, no full batch)."""


def user_error_in(error: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``error``, following ``raise ... from`` chains (Hydra's ``instantiate``
    wraps constructor errors in its own exception).

    Args:
        error: the exception raised.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
