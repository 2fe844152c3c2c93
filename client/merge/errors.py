"""The errors of merging adapters into a base checkpoint."""

from __future__ import annotations

from peftreg.sdk.errors import InvalidRequest, PeftregError


class MergeError(InvalidRequest):
    """A merge that cannot be done as asked; the message says why."""


class IncompatibleBase(MergeError):
    """An adapter that does not belong to the base it is asked to merge into."""


class MergeCancelled(PeftregError):
    """The caller cancelled the merge; nothing was left at the output."""
