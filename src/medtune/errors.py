"""Errors a user can fix. The command line prints their message as one line; any other exception is a bug and shows
its traceback.

All derive from ``ValueError`` (and ``MissingFileError`` also from ``FileNotFoundError``), so code written against the
exceptions raised before still catches them. ``ConfigError`` is also importable from ``medtune.config`` and
``DataError`` from ``medtune.data.types``.
"""
from __future__ import annotations

import re


class UserError(ValueError):
    """A problem the user can fix; the message names the file / key / flag and the fix."""


class ConfigError(UserError):
    """A config problem the user can fix; the message names the key / file and the fix."""


class DataError(UserError):
    """Bad input data: the message names the file(s) and the fix. Raised with every problem found, not the first."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a command they must run first writes) is missing."""


# torch's DataLoader re-raises an error from a worker process with the worker's traceback folded into its message
_WORKER_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)
_QUALIFIED_PREFIX = re.compile(r"^[\w.]+: ")


def one_line(err: BaseException) -> str:
    """What the CLI prints for a user's error: its message, and for an error raised in a DataLoader worker (a broken
    file met when a batch needs it) the original error's own line, not the worker's traceback."""
    text = str(err)
    if _WORKER_WRAPPED.match(text):
        return _QUALIFIED_PREFIX.sub("", text.rstrip().splitlines()[-1])
    return text
