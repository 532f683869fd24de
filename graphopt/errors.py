"""Errors graphopt raises on purpose. Each carries an exit code and an optional hint.

The CLI turns them into one clear line (plus the hint) and the exit code; anything else
that escapes is a bug and is shown with a traceback only under ``--debug``.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class: a problem graphopt can explain to the user."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(GraphoptError):
    """Bad command-line or API usage: unknown pass, bad option value, ..."""

    exit_code = 2


class ModelError(GraphoptError):
    """The input model cannot be read or is not a valid ONNX model."""

    exit_code = 3


class VerificationError(GraphoptError):
    """The optimized model does not match the original, or a pass broke it under --strict."""

    exit_code = 4


class PluginError(GraphoptError):
    """A plugin (pass or target) failed to load or does not satisfy its contract."""

    exit_code = 2
