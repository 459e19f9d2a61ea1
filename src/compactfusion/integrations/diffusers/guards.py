"""Guards for a parallel generation: outputs must be finite, and every rank must compute the same thing.

Pure functions (no state, no process group of their own): the runtime passes in what to check and, for
the cross-rank check, its communicator's ``all_gather_object``.

* ``generator_fingerprint(gen)`` — digest of the *full* generator state (an advanced generator differs
  from a fresh one with the same seed), for a list of generators too; ``None`` has its own fingerprint.
* ``tensor_digest(t)`` — cheap, order-independent, exact digest of a tensor's bits: equal for bitwise-equal
  tensors on any device and thread count; any single changed element changes it.
* ``check_finite(output, where)`` — ``NonFiniteOutputError`` (a ``ValueError``) naming ``where``.
* ``check_ranks_agree(all_gather_object, digest, what, step)`` — ``RankDivergenceError`` on every rank,
  naming the ranks that differ from rank 0.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["NonFiniteOutputError", "RankDivergenceError", "generator_fingerprint", "tensor_digest", "check_finite",
           "check_ranks_agree"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WEIGHT_MOD = 65521  # prime: two swapped elements get different weights unless 65521 apart


class NonFiniteOutputError(ValueError):
    """A generation produced NaN/Inf values; ``.where`` says where they were found."""

    def __init__(self, message: str, where: str = "", count: int = 0):
        super().__init__(message)
        self.where, self.count = where, count


class RankDivergenceError(RuntimeError):
    """Ranks that must hold identical values do not; ``.ranks`` differ from rank 0 at ``.step``."""

    def __init__(self, message: str, what: str = "", step: int | None = None, ranks: Sequence[int] = ()):
        super().__init__(message)
        self.what, self.step, self.ranks = what, step, list(ranks)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def generator_fingerprint(gen) -> str:
    """Digest of the full state of a ``torch.Generator`` (or a list/tuple of them, or ``None``)."""
    if gen is None:
        return "none"
    if isinstance(gen, (list, tuple)):
        return _digest("list", *[generator_fingerprint(g) for g in gen])
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, a list of them or None, got {type(gen).__name__}")
    state = gen.get_state()  # a CPU uint8 tensor for every device type
    return _digest(gen.device.type, state.numpy().tobytes())


def tensor_digest(t) -> str:
    """Exact digest of a tensor's bits: a plain and a position-weighted int64 sum of the elements' bit
    patterns (integer sums do not depend on reduction order, so devices and thread counts agree), plus
    shape and dtype. Costs a few elementwise ops; runs on the tensor's device."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor_digest needs a torch.Tensor or numpy array, got {type(t).__name__}")
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    x = x.contiguous().reshape(-1)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if x.numel() == 0:
        return _digest(tuple(t.shape), str(t.dtype), "empty")
    bits = x.view(_INT_OF_SIZE[x.element_size()]).to(torch.int64)
    weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % _WEIGHT_MOD + 1
    sums = torch.stack([bits.sum(), (bits * weights).sum()]).cpu().tolist()  # int64 wraps identically everywhere
    return _digest(tuple(t.shape), str(t.dtype), *sums)


def _count_nonfinite(x) -> tuple[int, int]:
    """(non-finite, total) elements in a tensor / array / nested list, tuple, dict or ``.images`` output."""
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.is_complex()):
            return 0, x.numel()
        return int((~torch.isfinite(x)).sum()), x.numel()
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.inexact):
            return 0, x.size
        return int((~np.isfinite(x)).sum()), x.size
    if isinstance(x, dict):
        x = list(x.values())
    elif hasattr(x, "images") and not isinstance(x, (list, tuple)):
        x = [x.images]
    if isinstance(x, (list, tuple)):
        bad = total = 0
        for item in x:
            b, n = _count_nonfinite(item)
            bad, total = bad + b, total + n
        return bad, total
    if hasattr(x, "size") and hasattr(x, "mode"):  # a PIL image: 8-bit, always finite
        return 0, 1
    if isinstance(x, float):
        return (0 if np.isfinite(x) else 1), 1
    return 0, 0


def check_finite(output: Any, where: str) -> None:
    """Raise ``NonFiniteOutputError`` if ``output`` holds NaN/Inf. ``where`` names the place for the message
    (e.g. ``"rank 1, layer 3 attention output, step 4"``)."""
    bad, total = _count_nonfinite(output)
    if bad:
        raise NonFiniteOutputError(f"{where}: {bad:,} of {total:,} values are NaN/Inf; no output was produced "
                                   f"(a NaN in the activations or a non-finite argument)", where, bad)


def check_ranks_agree(all_gather_object: Callable[[Any], list], digest: str, what: str, step: int | None = None) -> list:
    """Collective: gather every rank's ``digest`` of ``what``; raise ``RankDivergenceError`` on every rank
    if any differs from rank 0's. ``all_gather_object(obj)`` must return the list of every rank's object."""
    digests = list(all_gather_object(digest))
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        at = f" at step {step}" if step is not None else ""
        values = ", ".join(f"rank {r}: {d}" for r, d in enumerate(digests[:8])) + (" ..." if len(digests) > 8 else "")
        raise RankDivergenceError(f"ranks {bad} differ from rank 0 in {what}{at} ({values}); every rank must get "
                                  f"the same inputs (seeded generator, latents, callbacks)", what, step, bad)
    return digests
