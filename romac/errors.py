"""User-facing errors.

Every problem caused by the user's input (a file, a field, a tensor, a target that cannot hold the model)
is raised as a :class:`RomacError` whose message is one line: what is wrong, where, and what to do.
The CLI prints it and exits with code 2; anything else is a bug in romac and keeps its traceback.
"""

from __future__ import annotations


class RomacError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.message, self.where, self.hint = message, where, hint
        parts = [f"{where}: {message}" if where else message]
        if hint:
            parts.append(hint)
        super().__init__("; ".join(parts))


class CapacityError(RomacError):
    """The model, an adapter or the KV cache does not fit the target."""


class ArtifactError(RomacError):
    """An artifact directory does not match its manifest (corrupted, truncated, foreign)."""
