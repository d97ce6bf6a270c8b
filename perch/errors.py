"""Errors a user can act on. Library code raises them; only the CLI turns them into exit codes."""
from __future__ import annotations


class PerchError(Exception):
    """A problem with the user's input: the message names the problem and the fix. CLI exit code 2."""

    exit_code = 2


class UnsupportedModel(PerchError):
    """An architecture or variant Perch does not export (the message starts with 'not supported:')."""


class CheckFailed(Exception):
    """A fidelity or speed threshold failed. CLI exit code 1."""

    exit_code = 1
