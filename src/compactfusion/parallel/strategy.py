"""The strategy interface, the single-device strategy, and K/V helpers shared by the all-gather strategies.

A strategy turns local shards into attention outputs using the context's communicators and stream
coder. Stream keys use global ranks so they are unique across sub-groups:
``(layer, "k"|"v", src)`` for K/V a rank sends to its whole ring / SP group, and
``(layer, tensor, src, dst)`` for Ulysses chunks.

Joint (replicated) tokens: each rank's local queries see the joint K/V exactly once (joined to the local
block). The joint queries attend to the joint K/V plus the *public* view of every rank's K/V — what every
rank of the group holds (reconstructions, and for DistriFusion the previous step's) — in a fixed order,
so ``joint_out`` comes out bitwise identical on every rank and replicated tokens stay replicated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .local_attention import OnlineSoftmax
from .streams import raw_nbytes, split_bytes

if TYPE_CHECKING:
    from .context import Joint, ParallelContext

__all__ = ["Strategy", "LocalStrategy", "attend", "attend_joint", "KVCodec"]


def _cat(blocks: list[torch.Tensor]) -> torch.Tensor:
    blocks = [b for b in blocks if b.shape[1] > 0] or blocks[:1]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def attend(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """Exact attention of ``q`` over the concatenation of key blocks (one kernel call), in q's dtype."""
    acc = OnlineSoftmax()
    acc.add_block(q, _cat(ks), _cat(vs))
    return acc.result(q.dtype)


def attend_joint(joint: "Joint | None", ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor | None:
    """Joint queries over [joint K/V] + the public blocks ``ks``/``vs`` (same order on every rank)."""
    if joint is None:
        return None
    return attend(joint.q, [joint.k] + list(ks), [joint.v] + list(vs))


class Strategy:
    """Base class. ``attention`` returns ``(out, joint_out or None)``."""

    def __init__(self, ctx: "ParallelContext"):
        self.ctx = ctx

    def attention(self, q, k, v, joint, layer: int, step: int):
        raise NotImplementedError

    def flush(self) -> None:
        """Finish in-flight transfers so every stream state is up to date (before a consistency check)."""

    def reset(self) -> None:
        """Drop per-generation buffers."""

    def buffer_nbytes(self) -> int:
        return 0

    def holders(self, key) -> tuple[int, ...]:
        """Global ranks holding stream ``key``: K/V streams ``(layer, tensor, src)`` live on src's ring."""
        mesh = self.ctx.mesh
        c, u, _ = mesh.coords(key[2])
        return tuple(mesh.rank_of(c, u, r) for r in range(mesh.ring))


class LocalStrategy(Strategy):
    """strategy="none": the whole sequence is on this rank."""

    def attention(self, q, k, v, joint, layer, step):
        jk = [] if joint is None else [joint.k]
        jv = [] if joint is None else [joint.v]
        return attend(q, [k] + jk, [v] + jv), attend_joint(joint, [k], [v])


class KVCodec:
    """K and V of one rank packed into one payload (K bytes then V bytes) for a ring / all-gather.

    Streams ``(layer, "k", src)`` and ``(layer, "v", src)``; sizes follow from the shapes alone.
    """

    def __init__(self, ctx: "ParallelContext", layer: int, step: int, lens: list[int], like: torch.Tensor,
                 ranks: tuple[int, ...]):
        self.coder = ctx.coder
        self.layer, self.step, self.ranks = layer, step, ranks
        b, _, h, d = like.shape
        self.dtype = like.dtype
        self.shapes = [(b, n, h, d) for n in lens]
        self.sizes = [(self.coder.wire_nbytes("k", layer, step, s, self.dtype),
                       self.coder.wire_nbytes("v", layer, step, s, self.dtype)) for s in self.shapes]
        self.warmup = self.coder.warmup(layer, step)

    def nbytes(self, i: int) -> int:
        """Payload bytes of group member ``i``."""
        return sum(self.sizes[i])

    def raw_nbytes(self, i: int) -> int:
        """What member ``i``'s K and V weigh uncompressed."""
        return 2 * raw_nbytes(self.shapes[i], self.dtype)

    def encode(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """``(payload, k_hat, v_hat)`` for this rank (member ``i``); x_hat is what receivers decode."""
        src = self.ranks[i]
        pk, k_hat = self.coder.encode((self.layer, "k", src), "k", k, self.layer, self.step)
        pv, v_hat = self.coder.encode((self.layer, "v", src), "v", v, self.layer, self.step)
        return torch.cat([pk, pv]), k_hat, v_hat

    def decode(self, i: int, payload: torch.Tensor):
        """Member ``i``'s (K, V) from its payload; updates its streams' receiver state on this rank."""
        pk, pv = split_bytes(payload, self.sizes[i])
        src = self.ranks[i]
        k = self.coder.decode((self.layer, "k", src), "k", pk, self.shapes[i], self.dtype, self.layer, self.step)
        v = self.coder.decode((self.layer, "v", src), "v", pv, self.shapes[i], self.dtype, self.layer, self.step)
        return k, v

