"""strategy="ulysses": all-to-all from sequence shards to head shards and back (DeepSpeed-Ulysses).

Forward: rank ``me`` sends to each peer ``dst`` the Q/K/V of its own tokens for ``dst``'s heads and gets,
from every ``src``, ``src``'s tokens for its own heads; it then holds the whole sequence for H/U heads and
attends exactly. Backward: the output goes back the same way (heads -> sequence). Sequence shards may be
uneven (per-peer chunk sizes derive from the exchanged shard lengths); heads must split evenly.

Compression: every (layer, tensor, src, dst) chunk is its own residual stream with error feedback
(encoder key ``(layer, t, me, dst)``, decoder key ``(layer, t, src, me)``) for the tensors in
``compression.tensors`` (default q, k, v, o). The own chunk never travels and stays exact.

Joint (replicated) tokens: each rank slices its heads locally (no communication), attends with the full
sequence, and the joint output is all-gathered over heads (ledger tensor "joint_o"), so every rank ends
with the same bytes.
"""
from __future__ import annotations

import torch

from .sharding import heads_per_rank, shard_offsets
from .streams import raw_nbytes, split_bytes
from .strategy import Strategy, attend
from .traffic import StepTraffic, TrafficShape, output_gather, text_label

__all__ = ["UlyssesStrategy", "chunk_holders", "scatter_heads", "gather_heads", "slice_joint", "gather_joint_heads",
           "step_traffic"]

_QKV = ("q", "k", "v")


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=like.device)


def scatter_heads(ctx, comm, q, k, v, layer: int, step: int):
    """Sequence shards -> head shards: returns (Q, K, V) of shape (B, sum(lens), H/U, D) and ``lens``."""
    U, me = comm.size, comm.rank
    b, s, h, d = q.shape
    hl = heads_per_rank(h, U)
    if U == 1:
        return q, k, v, [s]
    coder, dt = ctx.coder, q.dtype
    lens = ctx.seq_lens(comm, "ulysses", layer, step, q)
    me_g = comm.ranks[me]
    chunks, unc = [], []
    for dst in range(U):
        if dst == me:
            chunks.append(_empty(q))
            unc.append(0)
            continue
        heads = slice(dst * hl, (dst + 1) * hl)
        parts = [coder.encode((layer, t, me_g, comm.ranks[dst]), t, x[:, :, heads], layer, step)[0]
                 for t, x in zip(_QKV, (q, k, v))]
        chunks.append(torch.cat(parts))
        unc.append(3 * raw_nbytes((b, s, hl, d), dt))
    sizes = [[0, 0, 0] if src == me else
             [coder.wire_nbytes(t, layer, step, (b, lens[src], hl, d), dt) for t in _QKV] for src in range(U)]
    got = comm.all_to_all_bytes(chunks, [sum(x) for x in sizes], layer=layer, step=step, tensor="qkv",
                                uncompressed_nbytes=unc, warmup=coder.warmup(layer, step))
    mine = slice(me * hl, (me + 1) * hl)
    cols = {t: [] for t in _QKV}
    for src in range(U):
        if src == me:  # own chunk: exact, never sent
            for t, x in zip(_QKV, (q, k, v)):
                cols[t].append(x[:, :, mine])
            continue
        for t, p in zip(_QKV, split_bytes(got[src], sizes[src])):
            cols[t].append(coder.decode((layer, t, comm.ranks[src], me_g), t, p, (b, lens[src], hl, d), dt,
                                        layer, step))
    full = [torch.cat(cols[t], dim=1) for t in _QKV]
    return full[0], full[1], full[2], lens


def gather_heads(ctx, comm, out_full: torch.Tensor, lens: list[int], layer: int, step: int) -> torch.Tensor:
    """Head shards -> sequence shards: (B, sum(lens), H/U, D) -> (B, lens[me], H, D)."""
    U, me = comm.size, comm.rank
    if U == 1:
        return out_full
    coder, dt = ctx.coder, out_full.dtype
    b, _, hl, d = out_full.shape
    offs = shard_offsets(lens)
    me_g = comm.ranks[me]
    chunks, unc = [], []
    for dst in range(U):
        if dst == me:
            chunks.append(_empty(out_full))
            unc.append(0)
            continue
        rows = out_full[:, offs[dst]:offs[dst] + lens[dst]]
        chunks.append(coder.encode((layer, "o", me_g, comm.ranks[dst]), "o", rows, layer, step)[0])
        unc.append(raw_nbytes(rows.shape, dt))
    shape = (b, lens[me], hl, d)
    recv = [0 if src == me else coder.wire_nbytes("o", layer, step, shape, dt) for src in range(U)]
    got = comm.all_to_all_bytes(chunks, recv, layer=layer, step=step, tensor="o", uncompressed_nbytes=unc,
                                warmup=coder.warmup(layer, step))
    pieces = [out_full[:, offs[me]:offs[me] + lens[me]] if src == me else
              coder.decode((layer, "o", comm.ranks[src], me_g), "o", got[src], shape, dt, layer, step)
              for src in range(U)]
    return torch.cat(pieces, dim=2)


def slice_joint(joint, comm):
    """This rank's heads of the replicated joint tokens (local slicing, no communication)."""
    if joint is None or comm.size == 1:
        return joint
    hl = heads_per_rank(joint.q.shape[2], comm.size)
    heads = slice(comm.rank * hl, (comm.rank + 1) * hl)
    return type(joint)(joint.q[:, :, heads], joint.k[:, :, heads], joint.v[:, :, heads])


def gather_joint_heads(ctx, comm, joint_out: torch.Tensor | None, layer: int, step: int):
    """All-gather the joint output's head shards (uncompressed; ledger tensor "joint_o")."""
    if joint_out is None or comm.size == 1:
        return joint_out
    parts = comm.all_gather_tensors(joint_out.contiguous(), layer=layer, step=step, tensor="joint_o",
                                    warmup=ctx.coder.warmup(layer, step))
    return torch.cat(parts, dim=2)


def chunk_holders(key) -> tuple[int, ...] | None:
    """The (src, dst) pair holding a Ulysses chunk stream ``(layer, tensor, src, dst)``; None for other keys."""
    return (key[2], key[3]) if len(key) == 4 else None


class UlyssesStrategy(Strategy):
    def holders(self, key) -> tuple[int, ...]:
        return chunk_holders(key) or super().holders(key)

    def attention(self, q, k, v, joint, layer, step):
        comm = self.ctx.ulysses_comm
        heads_per_rank(q.shape[2], comm.size)  # fail fast, identically on every rank, before any traffic
        qf, kf, vf, lens = scatter_heads(self.ctx, comm, q, k, v, layer, step)
        js = slice_joint(joint, comm)
        if js is None:
            out_full = attend(qf, [kf], [vf])
            joint_out = None
        else:
            # One exact call for the sequence and joint queries over [sequence K/V, joint K/V].
            both = attend(torch.cat([qf, js.q], dim=1), [kf, js.k], [vf, js.v])
            out_full, joint_out = both[:, :qf.shape[1]], both[:, qf.shape[1]:]
        out = gather_heads(self.ctx, comm, out_full, lens, layer, step)
        return out, gather_joint_heads(self.ctx, comm, joint_out, layer, step)


def step_traffic(shape: TrafficShape, wire, messages: int | None = None) -> StepTraffic:
    """Per layer: q|k|v to every peer (its heads of this rank's rows) in one all-to-all, then o back (this
    rank's heads of each peer's rows); replicated text: the text output all-gathered over heads, raw.

    ``messages``: per layer per rank, if the all-to-alls are split differently (default: q|k|v, o, text o)."""
    w, b = shape.world, shape.batch
    ch = heads_per_rank(shape.heads, w) * shape.head_dim
    n = shape.rows()
    joint_o = 0 if shape.split_text else (w - 1) * shape.raw(b * shape.text_tokens, ch)
    layer = tuple(3 * (w - 1) * wire(n[r], ch) + sum(wire(n[p], ch) for p in range(w) if p != r) + joint_o
                  for r in range(w))
    if messages is None:
        messages = (2 + (shape.text_tokens > 0 and not shape.split_text)) * (w - 1)
    return StepTraffic(layer=layer, layer_msgs=messages, gather=output_gather(shape), gather_msgs=w - 1,
                       tokens=tuple(n), overlap="none", text=text_label(shape))
