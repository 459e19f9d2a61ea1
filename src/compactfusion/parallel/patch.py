"""strategy="patch": synchronous all-gather of every rank's K/V, then one exact attention call locally.

With compression each rank residual-codes its own K and V once (streams ``(layer, "k"|"v", src)``), the
payloads are all-gathered (sizes differ per rank; every rank derives them from the shapes), every other
rank's payload is decoded into that origin's receiver state, and the own block uses the exact K/V
(unlike the reference, which attends to its own lossy reconstruction).
"""
from __future__ import annotations

from .strategy import KVCodec, Strategy, attend, attend_joint
from .traffic import StepTraffic, TrafficShape, output_gather, text_label

__all__ = ["PatchStrategy", "gather_kv", "step_traffic"]


def gather_kv(ctx, comm, k, v, layer: int, step: int):
    """All-gather K/V over ``comm``: returns (KVCodec, [(k_i, v_i) per member] public view).

    The public view holds every member's K/V as every rank sees it (decoded payloads, and this rank's own
    reconstruction in its slot).
    """
    lens = ctx.seq_lens(comm, "sp", layer, step, k)
    kv = KVCodec(ctx, layer, step, lens, k, comm.ranks)
    payload, k_hat, v_hat = kv.encode(comm.rank, k, v)
    parts = comm.all_gather_bytes(payload, [kv.nbytes(i) for i in range(comm.size)], layer=layer, step=step,
                                  tensor="kv", uncompressed_nbytes=kv.raw_nbytes(comm.rank), warmup=kv.warmup)
    view = [(k_hat, v_hat) if i == comm.rank else kv.decode(i, p) for i, p in enumerate(parts)]
    return kv, view


class PatchStrategy(Strategy):
    def attention(self, q, k, v, joint, layer, step):
        comm = self.ctx.sp_comm
        if comm.size == 1:
            return attend(q, [k] + ([joint.k] if joint else []), [v] + ([joint.v] if joint else [])), \
                attend_joint(joint, [k], [v])
        _, view = gather_kv(self.ctx, comm, k, v, layer, step)
        me = comm.rank
        ks = [k if i == me else kv[0] for i, kv in enumerate(view)]  # own block exact
        vs = [v if i == me else kv[1] for i, kv in enumerate(view)]
        if joint is not None:
            ks.append(joint.k)
            vs.append(joint.v)
        out = attend(q, ks, vs)
        return out, attend_joint(joint, [kv[0] for kv in view], [kv[1] for kv in view])


def step_traffic(shape: TrafficShape, wire, overlap: str = "none") -> StepTraffic:
    """Per layer a rank sends its K and V payloads (two streams of its rows) to each of the W-1 peers."""
    w, c = shape.world, shape.channels
    return StepTraffic(layer=tuple(2 * (w - 1) * wire(n, c) for n in shape.rows()), layer_msgs=w - 1,
                       gather=output_gather(shape), gather_msgs=w - 1, tokens=tuple(shape.rows()), overlap=overlap,
                       text=text_label(shape))
