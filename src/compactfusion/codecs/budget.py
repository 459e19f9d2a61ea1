"""``lowrank-int4-bpe:B`` — the int4 low-rank codec with its rank set by a bits-per-element budget.

A fixed rank costs a shape-dependent number of bits per element (``lowrank-int4:32`` is 1.04 bits on a
4096 x 128 stream but 2.1 bits on 128 x 128), so a fixed-rank spec cannot be compared with the 1-bit
sign codecs across batch sizes or models. Here the rank is the largest whose payload fits ``B * N * C / 8``
bytes (at least 1, at most min(N, C, MAX_RANK)): both sides derive it from (N, C, B), so the wire format
is exactly ``lowrank-int4:r`` with that r (docs/wire-formats.md) and nothing extra is sent.
"""
from __future__ import annotations

import re

from .lowrank import DEFAULT_ITERS, LOWRANK_SEED, LowRankInt4Codec
from .packing import packed_len

#: Largest budget accepted (bits per element); int4 factors of a full-rank matrix cost ~ min(N, C) bits.
MAX_BUDGET_BITS = 16.0
_NUMBER = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?\Z")


def parse_budget(arg: str) -> float:
    """"1.0" -> 1.0; ValueError unless a plain decimal in (0, MAX_BUDGET_BITS]."""
    if not isinstance(arg, str) or not _NUMBER.match(arg):
        raise ValueError(f"bits per element {arg!r} is not a plain decimal such as 1.0")
    bits = float(arg)
    if not 0.0 < bits <= MAX_BUDGET_BITS:
        raise ValueError(f"bits per element {bits:g} is outside (0, {MAX_BUDGET_BITS:g}]")
    return bits


def budget_rank(bits: float, n: int, c: int, max_rank: int) -> int:
    """The largest int4 low-rank rank whose payload fits ``bits * n * c / 8`` bytes (>= 1)."""
    per_rank = packed_len(n, 4) + packed_len(c, 4) + 8  # bytes one component costs on the wire
    r = int((bits * n * c / 8.0) // per_rank)
    return max(1, min(r, n, c, max_rank))


class BudgetLowRankInt4Codec(LowRankInt4Codec):
    """``lowrank-int4-bpe:B``: ``lowrank-int4:r`` with r = budget_rank(B, N, C)."""

    def __init__(self, arg: str, max_rank: int, iters: int = DEFAULT_ITERS, seed: int = LOWRANK_SEED):
        self.bits = parse_budget(arg)
        self.max_rank = int(max_rank)
        super().__init__(self.max_rank, iters, seed)
        self.spec = f"lowrank-int4-bpe:{arg}"

    def effective_rank(self, n: int, c: int) -> int:
        return budget_rank(self.bits, n, c, self.max_rank)
