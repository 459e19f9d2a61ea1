"""Pure helpers for splitting sequences and heads across ranks (no communication).

Uneven split rule (``torch.tensor_split`` semantics): with ``total = q * W + r`` the first ``r`` ranks hold
``q + 1`` tokens and the others ``q``. Every rank can compute every other rank's share from the total.
"""
from __future__ import annotations

import torch

__all__ = ["shard_sizes", "shard_offsets", "shard", "heads_per_rank", "flatten_tokens"]


def _check_count(x, what: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {x!r}")
    return x


def shard_sizes(total: int, world: int) -> list[int]:
    """Tokens held by each of ``world`` ranks for a sequence of ``total`` tokens."""
    _check_count(total, "total", 0)
    _check_count(world, "world", 1)
    q, r = divmod(total, world)
    return [q + 1 if i < r else q for i in range(world)]


def shard_offsets(sizes: list[int]) -> list[int]:
    """Start index of each shard: the exclusive prefix sum of ``sizes``."""
    offs, acc = [], 0
    for s in sizes:
        offs.append(acc)
        acc += s
    return offs


def shard(x: torch.Tensor, dim: int, world: int, rank: int) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (a view; no copy, no communication)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world})")
    sizes = shard_sizes(x.shape[dim], world)
    return x.narrow(dim, shard_offsets(sizes)[rank], sizes[rank])


def heads_per_rank(heads: int, degree: int) -> int:
    """Heads each Ulysses rank owns; the heads must split evenly."""
    if heads % degree != 0:
        raise ValueError(f"Ulysses needs the head count to be divisible by ulysses_degree: {heads} heads cannot "
                         f"be split over {degree} ranks; choose a ulysses_degree that divides {heads} (and use "
                         f"ring or usp with a smaller ulysses_degree for the rest)")
    return heads // degree


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B*S, H*D): the (N tokens, C channels) matrix a residual stream codes."""
    b, s, h, d = x.shape
    return x.reshape(b * s, h * d)
