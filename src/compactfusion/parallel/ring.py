"""strategy="ring": point-to-point ring attention with the next hop's transfer overlapped with compute.

Per layer on a ring of W ranks (this rank = member ``me``):
1. residual-code the own K and V once (streams ``(layer, "k"|"v", src)``) into one payload;
2. hop s = 0 .. W-1: start sending the payload held now to ``me + 1`` while receiving the next one from
   ``me - 1`` (``Communicator.ring_exchange``; sizes known from the shapes: every origin may hold a
   different number of tokens); meanwhile attend to the held block — hop 0 is the exact local K/V (plus
   the joint K/V), later hops decode the payload that originated at ``me - s`` exactly once — and merge
   with the log-sum-exp rule; then wait and forward the *still-compressed* bytes on the next hop.

Joint queries are merged per origin in a fixed order (joint block, then origin 0..W-1) over the public
view (the own block enters as its reconstruction), so every ring member computes the same joint output.
"""
from __future__ import annotations

import torch

from .local_attention import OnlineSoftmax, attention_with_lse
from .strategy import KVCodec, Strategy, attend, attend_joint
from .traffic import StepTraffic, TrafficShape, output_gather, text_label

__all__ = ["RingStrategy", "ring_attention", "step_traffic"]


def step_traffic(shape: TrafficShape, wire) -> StepTraffic:
    """W-1 hops per layer; at hop s a rank forwards the still-compressed K|V payload of the rank s back."""
    w, c = shape.world, shape.channels
    kv = [2 * wire(n, c) for n in shape.rows()]
    return StepTraffic(layer=tuple(sum(kv[(r - s) % w] for s in range(w - 1)) for r in range(w)), layer_msgs=w - 1,
                       gather=output_gather(shape), gather_msgs=w - 1, tokens=tuple(shape.rows()),
                       overlap="attention", text=text_label(shape))


def ring_attention(ctx, comm, q, k, v, joint, layer: int, step: int):
    """Ring attention over ``comm`` for local shards q/k/v (B, S_local, H, D); returns (out, joint_out)."""
    W, me = comm.size, comm.rank
    jk = [joint.k] if joint is not None else []
    jv = [joint.v] if joint is not None else []
    if W == 1:
        return attend(q, [k] + jk, [v] + jv), attend_joint(joint, [k], [v])
    lens = ctx.seq_lens(comm, "ring", layer, step, k)
    kv = KVCodec(ctx, layer, step, lens, k, comm.ranks)
    held, k_hat, v_hat = kv.encode(me, k, v)
    nxt, prv = (me + 1) % W, (me - 1) % W

    acc = OnlineSoftmax()
    joint_parts = [None] * W  # per origin, merged in origin order at the end
    for s in range(W):
        origin = (me - s) % W
        if s < W - 1:  # the next hop's transfer runs while this hop's block is decoded and attended
            handle = comm.ring_exchange(held, kv.nbytes((origin - 1) % W), dst=nxt, src=prv, layer=layer,
                                        step=step, tensor="kv", uncompressed_nbytes=kv.raw_nbytes(origin),
                                        warmup=kv.warmup)
        if s == 0:
            acc.add_block(q, _cat([k] + jk), _cat([v] + jv))
            kb, vb = k_hat, v_hat
        else:
            kb, vb = kv.decode(origin, held)
            acc.add_block(q, kb, vb)
        if joint is not None and kb.shape[1] > 0:
            joint_parts[origin] = attention_with_lse(joint.q, kb, vb)
        if s < W - 1:
            held = handle.wait()
    out = acc.result(q.dtype)
    if joint is None:
        return out, None
    jacc = OnlineSoftmax()
    jacc.add_block(joint.q, joint.k, joint.v)
    for part in joint_parts:
        if part is not None:
            jacc.add(*part)
    return out, jacc.result(q.dtype)


def _cat(blocks):
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


class RingStrategy(Strategy):
    def attention(self, q, k, v, joint, layer, step):
        return ring_attention(self.ctx, self.ctx.ring_comm, q, k, v, joint, layer, step)
