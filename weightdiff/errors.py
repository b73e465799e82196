"""Exceptions that weightdiff raises, each named after the condition it reports.

Every exception carries the exit code the command-line interface turns it into, so that the CLI maps
errors to exit codes in exactly one place. Messages are one line, name the file or option at fault and,
where possible, say what to do next. This module does no I/O and imports nothing heavy.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_NOTHING_COMPARABLE = 3


class WeightdiffError(Exception):
    """Base class: a problem weightdiff can explain in one line."""

    exit_code = EXIT_USAGE


class InputError(WeightdiffError):
    """A checkpoint, report or option that cannot be used as given."""


class CheckpointFormatError(InputError):
    """A file that claims to be a safetensors checkpoint but is not a valid one."""


class UnsupportedCheckpointError(InputError):
    """A checkpoint in a format weightdiff refuses to read (pickle files, unknown quantisation)."""


class OutputError(WeightdiffError):
    """An output path that cannot be written."""


class RemoteError(WeightdiffError):
    """A Hub or network problem: not found, unauthorised, unreachable, or a malformed answer."""


class NothingComparableError(WeightdiffError):
    """The two checkpoints share no tensor that can be compared."""

    exit_code = EXIT_NOTHING_COMPARABLE


class RuleError(WeightdiffError):
    """A gate rule or policy file that cannot be parsed or evaluated."""
