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


class NonFiniteError(ModeconnError):
    """The work produced NaN or inf (a diverged training, a path whose loss overflows).

    modeconn's one rule for non-finite values: non-finite *inputs* (weights in a checkpoint, data
    values) are refused when loaded (a :class:`CheckpointError` / :class:`DataError`, exit 2);
    non-finite *results* are reported as NaN (``null`` in JSON) and end the command with this
    error, one line on stderr and exit code 1, after the outputs that could be written.
    """
