"""Errors raised by the parallel layer (communication errors come from ``compactfusion.comm``)."""
from __future__ import annotations

from ..comm.errors import CommError, CommTimeoutError

__all__ = ["ConsistencyError", "ConfigMismatchError", "ShapeMismatchError", "CommError", "CommTimeoutError"]


class ConsistencyError(RuntimeError):
    """Copies of a residual stream's state differ between its sender and a receiver (caches drifted)."""

    def __init__(self, message: str, stream=None, ranks=None, step=None):
        super().__init__(message)
        self.stream, self.ranks, self.step = stream, ranks, step

    def __reduce__(self):
        return (type(self), (self.args[0], self.stream, self.ranks, self.step))


class ConfigMismatchError(ValueError):
    """Ranks were started with different configurations or shapes (found by ``check_agreement``)."""

    def __init__(self, message: str, ranks=None):
        super().__init__(message)
        self.ranks = ranks

    def __reduce__(self):
        return (type(self), (self.args[0], self.ranks))


class ShapeMismatchError(ValueError):
    """Ranks called the same attention layer with incompatible local shapes or dtypes."""
