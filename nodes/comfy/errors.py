"""The error every node raises for bad input: the message names the input and the fix."""

from __future__ import annotations


class InverseInputError(ValueError):
    """Bad node input: the message names the input and the fix."""
