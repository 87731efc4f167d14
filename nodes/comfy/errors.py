"""The error every node raises for bad input: the message names the input and the fix."""

from __future__ import annotations


class InverseInputError(ValueError):
    """Bad node input: the message names the input and the fix."""


class PureNoiseStartError(InverseInputError):
    """A flow model's SIGMAS start at s = 1, pure noise, where the pack's solvers cannot evaluate the
    model: a node that drops steps itself (the FlowEdit Sampler) catches it and names its own fix."""
