"""Errors raised by the communication layer, and the one place that waits on backend work.

Every wait goes through :func:`wait_works`, which uses ``Work.wait(timeout=...)``: on gloo in
torch 2.13 this returns on time for collectives and point-to-point ops alike and raises
``RuntimeError("... timed out ...")``, so nothing here can hang on a dead or absent peer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

__all__ = ["CommError", "CommTimeoutError", "OpContext", "wait_works"]


@dataclass(frozen=True)
class OpContext:
    """What an error message names: the op, the caller's layer/step/tensor, the group and timeout."""

    op: str
    layer: Any = None
    step: Any = None
    tensor: Any = None
    ranks: tuple[int, ...] = ()
    timeout_s: float | None = None

    def describe(self) -> str:
        return (f"{self.op} (layer={self.layer}, step={self.step}, tensor={self.tensor!r}) "
                f"on group ranks {list(self.ranks)}")


class CommError(RuntimeError):
    """A backend failure (e.g. a peer closed its connection), with the op's context attached."""

    def __init__(self, message: str, context: OpContext | None = None):
        super().__init__(message)
        self.context = context
        for k in ("op", "layer", "step", "tensor", "ranks", "timeout_s"):
            setattr(self, k, getattr(context, k, None))

    def __reduce__(self):  # keep picklable across process boundaries (tests send these to the parent)
        return (type(self), (self.args[0], self.context))


class CommTimeoutError(CommError):
    """An op did not complete in time: a peer probably died, hangs, or skipped this op."""


_TIMEOUT_WORDS = ("timed out", "timeout")


def _looks_like_timeout(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return any(w in msg for w in _TIMEOUT_WORDS)


def timeout_error(ctx: OpContext, waited_s: float, cause: BaseException | None = None) -> CommTimeoutError:
    hint = ("a peer probably died, is stuck, or skipped this op (every rank of the group must issue "
            "the same communication ops in the same order)")
    tail = f" [backend: {str(cause).splitlines()[0][:200]}]" if cause is not None else ""
    return CommTimeoutError(f"{ctx.describe()} did not complete within the {ctx.timeout_s:g} s timeout "
                            f"(waited {waited_s:.2f} s); {hint}{tail}", ctx)


def backend_error(ctx: OpContext, cause: BaseException) -> CommError:
    first = str(cause).strip().splitlines()[0][:500] if str(cause).strip() else type(cause).__name__
    return CommError(f"{ctx.describe()} failed in the backend: {first}", ctx)


def wait_works(works: Sequence[Any], ctx: OpContext) -> None:
    """Wait for all ``works`` within ``ctx.timeout_s`` seconds in total, counted from this call.

    Raises :class:`CommTimeoutError` on expiry and :class:`CommError` for any other backend error.
    """
    timeout = float(ctx.timeout_s if ctx.timeout_s is not None else 1e9)
    t0 = time.monotonic()
    deadline = t0 + timeout
    for w in works:
        if w is None:
            continue
        # At least 10 ms even past the deadline: gloo p2p work reports completion only via wait(),
        # so a finished message must still get a (short) wait rather than be declared timed out.
        remaining = max(deadline - time.monotonic(), 0.01)
        try:
            ok = w.wait(timeout=timedelta(seconds=remaining))
        except Exception as e:  # gloo raises RuntimeError/DistBackendError for both cases
            now = time.monotonic()
            if _looks_like_timeout(e) or now >= deadline - 1e-3:
                raise timeout_error(ctx, now - t0, e) from e
            raise backend_error(ctx, e) from e
        if ok is False:  # some backends report a timeout by returning False instead of raising
            raise timeout_error(ctx, time.monotonic() - t0)
