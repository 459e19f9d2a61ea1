"""strategy="usp": Ulysses inside, ring outside (unified sequence parallelism).

Ulysses all-to-all within the Ulysses group turns sequence shards into head shards over the group's
tokens; the ring then runs over the ring group on those head-sliced tensors; the output returns through
the reverse all-to-all. Both parts use the context's stream coder, so compression applies to the
Ulysses chunks (Q/K/V/O streams ``(layer, t, src, dst)``) and to the ring's K/V (``(layer, t, src)``)
as configured by ``compression.tensors``. Joint tokens are head-sliced locally, ring-attended within the
ring group, and their output is all-gathered over the Ulysses group.
"""
from __future__ import annotations

from .ring import ring_attention
from .sharding import heads_per_rank
from .strategy import Strategy
from .ulysses import chunk_holders, gather_heads, gather_joint_heads, scatter_heads, slice_joint

__all__ = ["USPStrategy"]


class USPStrategy(Strategy):
    def holders(self, key) -> tuple[int, ...]:  # Ulysses chunks and ring K/V streams
        return chunk_holders(key) or super().holders(key)

    def attention(self, q, k, v, joint, layer, step):
        ucomm, rcomm = self.ctx.ulysses_comm, self.ctx.ring_comm
        heads_per_rank(q.shape[2], ucomm.size)
        qf, kf, vf, lens = scatter_heads(self.ctx, ucomm, q, k, v, layer, step)
        out_u, joint_out = ring_attention(self.ctx, rcomm, qf, kf, vf, slice_joint(joint, ucomm), layer, step)
        out = gather_heads(self.ctx, ucomm, out_u, lens, layer, step)
        return out, gather_joint_heads(self.ctx, ucomm, joint_out, layer, step)
