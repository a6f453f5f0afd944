"""The one error type of the data package: the input's fault, printed by the CLI as one line."""

from __future__ import annotations


class DataError(ValueError):
    """A row, file or setting that cannot become training examples.

    `reason` is a short, stable key ("invalid JSON", "no assistant turn", ...) under which
    skipped rows are counted; the message says where and what in full.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message
