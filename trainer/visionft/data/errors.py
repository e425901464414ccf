"""The error of all data: a sample that cannot be used, with the sample, the field and the fix."""

from __future__ import annotations


class BadSampleError(ValueError):
    """A sample that cannot be used: a broken or refused image, a malformed record, or one that is too long.

    Attributes:
        index (int | None): the sample's index in the batch source (dataset index when known).
        field (str): which part of the sample is at fault, e.g. ``"messages[0].content[1].image"``.
        reason (str): what is wrong and how to fix it.
    """

    def __init__(self, reason: str, index: int | None = None, field: str = "sample"):
        self.index = index
        self.field = field
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"sample {self.index}" if self.index is not None else "sample"
        return f"{where}, field {self.field}: {self.reason}"

    def at(self, index: int | None, field: str | None = None) -> BadSampleError:
        """Returns the same error located at ``index`` (and ``field``), for callers that know them."""
        return BadSampleError(
            self.reason, index=index if index is not None else self.index, field=field or self.field
        )
