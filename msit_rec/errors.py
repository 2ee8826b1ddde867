"""Project exceptions: every user-facing failure names the offending file, column or key."""

from __future__ import annotations


class MsitError(Exception):
    """Base class for errors a user can fix (bad config, bad data); the CLI prints them without a traceback."""


class ConfigError(MsitError):
    """A config key is unknown, missing or of the wrong type/value."""


class SchemaError(MsitError):
    """An input table lacks a column or a column has the wrong type."""


class DataError(MsitError):
    """An input file is unreadable or its content breaks the data contract."""


class TrainingError(MsitError):
    """Training cannot go on (e.g. a non-finite loss); raised on every rank at the same step, so the CLI reports it
    once (from the process the user started) and exits 2."""
