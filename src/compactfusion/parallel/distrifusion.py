"""strategy="distrifusion": K/V all-gather one step stale, overlapped with the rest of the step.

Per layer (buffers live in the strategy, i.e. per context, and are dropped by ``reset``):
* steps < ``stale_warmup_steps`` (and the first time a layer is seen): synchronous all-gather — exact;
* later steps: launch this step's asynchronous all-gather of the own K/V (consumed at the next step), then
  take the *previous* step's gathered K/V for the remote blocks and the fresh local K/V for the own block.

With compression the asynchronous gather carries residual payloads (stale *and* compressed): a receiver
decodes a payload when it consumes it, one step later. Decoding order per stream is unchanged, so sender
and receiver states still agree once the payload is consumed (``flush`` consumes early for checks).
"""
from __future__ import annotations

from ..comm import CommError
from . import patch
from .patch import gather_kv
from .strategy import KVCodec, Strategy, attend, attend_joint
from .traffic import StepTraffic, TrafficShape

__all__ = ["DistriFusionStrategy", "step_traffic"]


def step_traffic(shape: TrafficShape, wire) -> StepTraffic:
    """patch's all-gather, launched asynchronously: after the synchronous steps it hides behind the step."""
    return patch.step_traffic(shape, wire, overlap="step")


class _Pending:
    """An in-flight gather of one layer's K/V: the handle plus what is needed to decode it later."""

    def __init__(self, handle, kv: KVCodec, k_hat, v_hat):
        self.handle, self.kv, self.k_hat, self.v_hat = handle, kv, k_hat, v_hat


class DistriFusionStrategy(Strategy):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._view: dict[int, list] = {}         # layer -> last consumed public view [(k_i, v_i)]
        self._pending: dict[int, _Pending] = {}  # layer -> gather launched at an earlier step

    def attention(self, q, k, v, joint, layer, step):
        comm = self.ctx.sp_comm
        jk = [joint.k] if joint is not None else []
        jv = [joint.v] if joint is not None else []
        if comm.size == 1:
            return attend(q, [k] + jk, [v] + jv), attend_joint(joint, [k], [v])
        me = comm.rank
        stale = step >= self.ctx.config.stale_warmup_steps and (layer in self._pending or layer in self._view)
        if not stale:
            self._drop(layer)
            _, view = gather_kv(self.ctx, comm, k, v, layer, step)
            self._view[layer] = view
        else:
            # Launch first so the transfer overlaps this step's decode and attention.
            lens = self.ctx.seq_lens(comm, "sp", layer, step, k)
            kv = KVCodec(self.ctx, layer, step, lens, k, comm.ranks)
            payload, k_hat, v_hat = kv.encode(me, k, v)
            handle = comm.all_gather_async(payload, [kv.nbytes(i) for i in range(comm.size)], layer=layer,
                                           step=step, tensor="kv", uncompressed_nbytes=kv.raw_nbytes(me),
                                           warmup=kv.warmup)
            view = self._consume(layer)
            self._pending[layer] = _Pending(handle, kv, k_hat, v_hat)
        ks = [k if i == me else kv_[0] for i, kv_ in enumerate(view)] + jk  # own block always fresh
        vs = [v if i == me else kv_[1] for i, kv_ in enumerate(view)] + jv
        return attend(q, ks, vs), attend_joint(joint, [x[0] for x in view], [x[1] for x in view])

    def _consume(self, layer: int) -> list:
        """The newest public view of ``layer``: waits for and decodes its pending gather, if any."""
        p = self._pending.pop(layer, None)
        if p is not None:
            parts = p.handle.wait()
            me = self.ctx.sp_comm.rank
            self._view[layer] = [(p.k_hat, p.v_hat) if i == me else p.kv.decode(i, x) for i, x in enumerate(parts)]
        return self._view[layer]

    def _drop(self, layer: int) -> None:
        p = self._pending.pop(layer, None)
        if p is not None:
            p.handle.wait()  # a synchronous step after async ones: retire the transfer (never decoded)
        self._view.pop(layer, None)

    def flush(self) -> None:
        for layer in sorted(self._pending):
            self._consume(layer)

    def reset(self) -> None:
        pending, self._pending = self._pending, {}
        self._view.clear()
        for p in pending.values():
            try:
                p.handle.wait()  # keep the group's message sequence aligned; the data is discarded
            except CommError:
                pass  # the communicator is poisoned and will report on its next use

    def buffer_nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for view in self._view.values() for kv in view for t in kv)
        for p in self._pending.values():
            n += sum(p.kv.nbytes(i) for i in range(len(p.kv.shapes)))
        return n
