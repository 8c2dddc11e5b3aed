"""Errors a user can fix. The command line prints their message as one line; any other exception is a bug and shows
its traceback.

All derive from ``ValueError`` (and ``MissingFileError`` also from ``FileNotFoundError``), so code written against the
exceptions raised before still catches them. ``ConfigError`` is also importable from ``medtune.config`` and
``DataError`` from ``medtune.data.types``.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message names the file / key / flag and the fix."""


class ConfigError(UserError):
    """A config problem the user can fix; the message names the key / file and the fix."""


class DataError(UserError):
    """Bad input data: the message names the file(s) and the fix. Raised with every problem found, not the first."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a command they must run first writes) is missing."""
