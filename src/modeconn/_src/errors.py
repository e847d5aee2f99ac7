"""The exceptions modeconn raises for bad input: each message says what is wrong and what to do."""

from __future__ import annotations


class ModeconnError(Exception):
    """Base class: a user-facing error. The CLI prints its message as one line and exits with 2."""


class SpecError(ModeconnError):
    """A permutation spec cannot be inferred, or does not fit the model/state it is used with."""


class IncompatibleModelsError(ModeconnError):
    """Two models or states do not share one architecture (names, shapes or dtypes differ)."""


class CheckpointError(ModeconnError):
    """A checkpoint is missing, corrupt, unsafe to load, or does not fit the requested model."""


class DataError(ModeconnError):
    """A data source is unknown, missing, or malformed."""


class ConfigError(ModeconnError):
    """A configuration (YAML recipe, option combination) is invalid."""
