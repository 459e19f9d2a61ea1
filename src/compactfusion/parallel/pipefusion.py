"""strategy="pipefusion": patch-level pipeline parallelism with residual-coded stage-to-stage activations.

PipeFusion (xDiT; Fang et al., "PipeFusion: Patch-level Pipeline Parallelism for Diffusion Transformers
Inference", 2024) splits the transformer's blocks into ``W`` contiguous stages, one per rank of the
pipeline group, and the image tokens into ``M`` patches. Within a denoising step the patches flow
through the stages one after another, so stage ``s`` works on patch ``p`` while stage ``s + 1`` works on
patch ``p - 1``. Only two things travel:

* at each stage boundary, the hidden states of each patch (the block inputs the plan ``carry``-names,
  e.g. FLUX's image and text streams), as one residual stream per (sender, patch, tensor) coded with the
  configured codec and error feedback (CompactFusion applied to the boundary: adjacent steps' boundary
  activations are as redundant as K/V);
* once per step, the last stage's output (the noise prediction), raw, to every other stage, so the
  scheduler step and the final image are identical on every rank.

Attention in a stage, for patch ``p``: the queries of ``p`` (plus joint text) attend to a per-layer K/V
buffer of the whole image held by the rank that owns the layer, in which ``p``'s slot has just been
overwritten with its fresh K/V. Slots of patches before ``p`` were refreshed earlier in this step, those
after ``p`` are one step stale — xDiT's semantics. Synchronous steps (the first ``stale_warmup_steps``)
run the whole image as one patch: exact, and they fill the buffers and seed every patch stream.

Joint text tokens (MMDiT double-stream blocks), ``pipefusion_text="first"`` (the default): the text runs
in the first patch pass of each step only — its queries see patch 0's fresh K/V and the buffer — and its
K/V are kept per layer like a patch's; the later passes run without text (zero text tokens) and attend to
those K/V of this step. Text then costs one pass of compute and one boundary payload per step, not M.
``"every"``: each patch pass carries its own copy of the text through the stages with fresh text K/V
(M times the text work and bytes). Text only feeds the image output either way.

This module holds the per-branch state (K/V buffers, boundary coding); the diffusers runtime
(``integrations/diffusers/pipeline.py``) drives the patch loop and the stage hooks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..comm import CommError
from .sharding import shard_sizes
from .strategy import Strategy, attend, attend_joint
from .streams import raw_nbytes
from .traffic import StepTraffic, TrafficShape

__all__ = ["PipeFusionStrategy", "PatchSlot", "HIDDEN", "stage_traffic", "step_traffic"]

#: The tensor name of boundary activations in stream keys, ``CompressionConfig.tensors`` and the ledger.
HIDDEN = "hidden"


class PatchSlot(NamedTuple):
    """Which patch the current transformer pass holds: index ``p``, token offset and count, image total."""

    index: int
    offset: int
    size: int
    total: int
    count: int  # patches in this pass's step (1 = synchronous)
    text: bool = True  # this pass runs the joint text (False: the text K/V of this step's text pass are attended)
    text_patch: "int | None" = None  # the patch whose stream carries the text (None: every patch stream)


def _as4d(x: torch.Tensor) -> torch.Tensor:
    """(B, S, ...) -> (B, S, 1, C): the layout StreamCoder codes (rows = tokens)."""
    return x.reshape(x.shape[0], x.shape[1], 1, -1)


class PipeFusionStrategy(Strategy):
    """Stale-K/V attention over the patch buffers, and the boundary transfers of one branch."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (K, V) of the whole image
        self._text_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> joint text (K, V) of the text pass
        self._sends: list = []  # in-flight boundary sends of this step (waited by ``finish_step``)

    # -- attention -----------------------------------------------------------------------------
    def attention(self, q, k, v, joint, layer, step):
        slot: PatchSlot | None = getattr(self.ctx, "patch", None)
        jk = [] if joint is None else [joint.k]
        jv = [] if joint is None else [joint.v]
        if slot is not None and slot.text_patch is not None:
            if joint is not None:  # the text pass: its K/V serve the passes without text
                self._text_kv[layer] = (joint.k.clone(), joint.v.clone())
            elif layer in self._text_kv:  # a pass without text: the text pass's K/V, like an earlier patch's
                tk, tv = self._text_kv[layer]
                if tk.shape[0] != q.shape[0]:
                    raise RuntimeError(f"pipefusion layer {layer}, step {step}: buffered text K/V of batch "
                                       f"{tk.shape[0]} for a pass of batch {q.shape[0]}")
                jk, jv = [tk], [tv]
        if slot is None or slot.count == 1:
            if slot is not None and k.shape[1] != slot.total:
                raise RuntimeError(f"pipefusion layer {layer}: a synchronous pass holds {k.shape[1]} image tokens, "
                                   f"the plan's split gave {slot.total}")
            self._kv[layer] = (k.clone(), v.clone())
            return attend(q, [k] + jk, [v] + jv), attend_joint(joint, [k], [v])
        buf = self._kv.get(layer)
        b, n, h, d = k.shape
        if buf is None or buf[0].shape != (b, slot.total, h, d) or buf[0].dtype != k.dtype or n != slot.size:
            raise RuntimeError(
                f"pipefusion layer {layer}, step {step}: no K/V buffer of {slot.total} tokens from a synchronous step "
                f"for patch {slot.index} ({n} tokens); the resolution or batch changed within a generation, or "
                f"stale_warmup_steps is 0 (it must be >= 1)")
        kb, vb = buf
        kb[:, slot.offset:slot.offset + n].copy_(k)  # this patch fresh; earlier patches of this step too
        vb[:, slot.offset:slot.offset + n].copy_(v)
        return attend(q, [kb] + jk, [vb] + jv), attend_joint(joint, [kb], [vb])

    # -- stage boundaries ----------------------------------------------------------------------
    def _stream(self, src_global: int, patch: int, name: str):
        return ("pipe", src_global, patch, name)

    def send(self, boundary: int, tensors: dict, slot: PatchSlot, step: int, joint_names=()) -> None:
        """Start sending this pass's carried tensors to the next stage (one payload per patch stream).

        A synchronous pass sends the whole image as ``M`` per-patch payloads (slices of the image tokens;
        joint tensors replicated), so every patch stream has its state when the patches start to flow.
        """
        comm, me = self.ctx.ring_comm, self.ctx.ring_comm.rank
        coder = self.ctx.coder
        src = comm.ranks[me]
        for p, off, size in self._patches(slot):
            parts, unc = [], 0
            warm = coder.warmup(boundary, step)
            for name in self._carried(tensors, joint_names, slot, p):
                x = tensors[name]
                if slot.count == 1 and name not in joint_names:
                    x = x.narrow(1, off, size)
                x4 = _as4d(x)
                payload, _ = coder.encode(self._stream(src, p, name), HIDDEN, x4, boundary, step)
                parts.append(payload)
                unc += raw_nbytes(x4.shape, x4.dtype)
            payload = torch.cat(parts) if len(parts) > 1 else parts[0]
            self._sends.append(comm.pair_send(payload, me + 1, layer=boundary, step=step, tensor=HIDDEN,
                                              uncompressed_nbytes=unc, warmup=warm))

    def recv(self, boundary: int, like: dict, slot: PatchSlot, step: int, joint_names=()) -> dict:
        """The previous stage's carried tensors for this pass, decoded (shapes/dtypes from ``like``)."""
        comm, me = self.ctx.ring_comm, self.ctx.ring_comm.rank
        coder = self.ctx.coder
        src = comm.ranks[me - 1]
        pieces: dict = {n: [] for n in like}
        for p, off, size in self._patches(slot):
            names = self._carried(like, joint_names, slot, p)
            shapes = {}
            for name in names:
                x = like[name]
                shp = list(x.shape)
                if slot.count == 1 and name not in joint_names:
                    shp[1] = size
                shapes[name] = tuple(shp)
            sizes = [coder.wire_nbytes(HIDDEN, boundary, step, _shape4(shapes[n]), like[n].dtype) for n in names]
            try:
                payload = comm.pair_recv(sum(sizes), me - 1, layer=boundary, step=step, tensor=HIDDEN,
                                         device=like[names[0]].device).wait()
            except CommError as e:
                raise type(e)(f"pipefusion stage {me} (rank {comm.ranks[me]}) waiting for patch {p} of stage {me - 1} "
                              f"(rank {src}): {e}", e.context) from e
            for name, part in zip(names, torch.split(payload, sizes)):
                x4 = coder.decode(self._stream(src, p, name), HIDDEN, part, _shape4(shapes[name]), like[name].dtype,
                                  boundary, step)
                pieces[name].append(x4.reshape(shapes[name]))
        out = {}
        for name, got in pieces.items():
            if not got:  # text this pass does not carry (zero tokens): the input as it is
                out[name] = like[name]
            elif slot.count == 1 and len(got) > 1:
                out[name] = got[0] if name in joint_names else torch.cat(got, dim=1)
            else:
                out[name] = got[0]
        return out

    @staticmethod
    def _carried(tensors: dict, joint_names, slot: PatchSlot, patch: int) -> list:
        """The carried tensors patch ``patch``'s stream holds in this pass (the text rides one stream, or each)."""
        names = []
        for name in sorted(tensors):
            if name in joint_names:
                if tensors[name].shape[1] == 0:  # a pass without text
                    continue
                if slot.count == 1 and slot.text_patch is not None and patch != slot.text_patch:
                    continue
            names.append(name)
        return names

    def _patches(self, slot: PatchSlot):
        """``(patch index, offset, size)`` of the streams a pass covers: its own, or all M when synchronous."""
        if slot.count > 1:
            return [(slot.index, slot.offset, slot.size)]
        sizes = self.ctx.patch_sizes(slot.total)
        offs = [sum(sizes[:i]) for i in range(len(sizes))]
        return list(zip(range(len(sizes)), offs, sizes))

    def broadcast_output(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The last stage's ``x`` on every stage (raw bytes; counted in the ledger as tensor "out")."""
        comm = self.ctx.ring_comm
        last = comm.size - 1
        if comm.size == 1:
            return x
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        if comm.rank == last:
            handles = [comm.pair_send(x.reshape(-1).view(torch.uint8), i, layer=-1, step=step, tensor="out")
                       for i in range(last)]
            for h in handles:
                h.wait()
            return x
        try:
            # the last stage sends to ranks 0, 1, ... in order on its one link: rank r waits behind r messages
            raw = comm.pair_recv(nbytes, last, layer=-1, step=step, tensor="out", device=x.device,
                                 behind=comm.rank).wait()
        except CommError as e:
            raise type(e)(f"pipefusion stage {comm.rank} (rank {comm.ranks[comm.rank]}) waiting for the output of the "
                          f"last stage (rank {comm.ranks[last]}): {e}", e.context) from e
        return raw.view(x.dtype).reshape(x.shape)

    def finish_step(self) -> None:
        """Wait for this step's boundary sends (bounded by the communicator's timeout)."""
        sends, self._sends = self._sends, []
        for h in sends:
            h.wait()

    def flush(self) -> None:
        self.finish_step()

    def reset(self) -> None:
        sends, self._sends = self._sends, []
        for h in sends:
            try:
                h.wait()
            except CommError:
                pass  # the communicator is poisoned and reports on its next use
        self._kv.clear()
        self._text_kv.clear()

    def buffer_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self._kv, self._text_kv) for kv in d.values() for t in kv)

    def holders(self, key) -> tuple[int, ...]:
        """Boundary stream ``("pipe", src, patch, name)``: the sender and the next stage."""
        if key and key[0] == "pipe":
            return (key[1], key[1] + 1)
        return super().holders(key)


def _shape4(shape) -> tuple:
    n = 1
    for s in shape[2:]:
        n *= int(s)
    return (int(shape[0]), int(shape[1]), 1, n)


def stage_traffic(tokens: int, text_tokens: int, hidden: int, out_channels: int, stages: int, patches: int,
                  carried_text: bool, text_passes: int = 1) -> dict:
    """Elements one pipeline group moves per denoising step (after warmup), by kind.

    ``boundary``: every boundary carries every image token once per step, plus, when text rides along
    (MMDiT), the text tokens once per pass that runs them (``text_passes``: 1 under
    ``pipefusion_text="first"``, ``patches`` under ``"every"``); ``out``: the last stage's output to the
    other stages. The element counts times the codec's bits per element give the wire bytes (raw for ``out``).
    """
    per_boundary = tokens * hidden + (text_passes * text_tokens * hidden if carried_text else 0)
    return {"boundary": (stages - 1) * per_boundary, "out": (stages - 1) * tokens * out_channels,
            "messages": (stages - 1) * patches + (stages - 1)}


def step_traffic(shape: TrafficShape, wire) -> StepTraffic:
    """Per-rank bytes of one step (registry formula): ``stage_traffic``'s elements coded per (patch, tensor) stream.

    One residual stream per image patch plus, when joint (MMDiT) text rides along, the text once per pass that
    runs it (``shape.text_passes``: None = 1, ``pipefusion_text="first"``; M for ``"every"``);
    stages 0..W-2 send their boundary (one unit per step, M messages), the last stage sends the output raw to
    the W-1 others. ``slot``: what one pipeline slot sends on average (the largest patch, plus its share of the
    text: all of it under "every", 1/M under "first").
    """
    w, c, b, t = shape.world, shape.channels, shape.batch, shape.text_tokens
    patches = w if shape.patches is None else shape.patches
    if not 1 <= patches <= shape.image_tokens:
        raise ValueError(f"pipefusion: num_patches={patches} must be between 1 and the {shape.image_tokens} image tokens")
    if shape.layers < w:
        raise ValueError(f"{shape.layers} blocks do not make {w} stages")
    carried = t > 0  # cross-attention text is never sent
    passes = 1 if shape.text_passes is None else shape.text_passes
    if passes not in (1, patches):
        raise ValueError(f"pipefusion: the text runs in 1 pass per step ('first') or in all {patches} ('every'), "
                         f"not {passes}")
    st = stage_traffic(shape.image_tokens, t, c, shape.out_channels, w, patches, carried, passes)
    sizes = shard_sizes(shape.image_tokens, patches)  # the runtime's split (ParallelContext.patch_sizes)
    streams = [b * n for n in sizes] + ([b * t] * passes if carried else [])
    if w > 1 and sum(streams) * c * (w - 1) != b * st["boundary"]:
        raise RuntimeError(f"pipefusion streams ({sum(streams)} rows) disagree with stage_traffic ({st['boundary']})")
    out = b * st["out"] * shape.dtype_bytes if w > 1 else 0
    return StepTraffic(layer=(sum(wire(n, c) for n in streams),) * (w - 1) + (0,), layer_msgs=patches,
                       gather=(0,) * (w - 1) + (out,), gather_msgs=w - 1,
                       tokens=(b * (sizes[0] + (t if carried else 0)),) * w, overlap="pipeline",
                       text=("carried" if passes > 1 or patches == 1 else "carried once") if carried else "cross-attention",
                       units=1,
                       slot=wire(b * sizes[0], c) + (wire(b * t, c) * passes / patches if carried else 0),
                       patch_sizes=tuple(sizes))
