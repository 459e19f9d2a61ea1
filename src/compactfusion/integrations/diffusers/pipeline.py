"""PipeFusion on a diffusers transformer: stage hooks on its blocks and the per-step patch loop.

The family plan's :class:`~.plans.Stages` names the block lists (in execution order) and the block inputs
that carry the running state (``carry``). The blocks are cut into contiguous stages balanced by parameter
count, one per rank of the pipeline group. On each rank:

* blocks of other stages are replaced by a pass-through (they return their carried inputs in the order
  the block would return its outputs) and their weights are released (moved to the ``meta`` device), so a
  rank holds only its stage's weights;
* the first block of this stage (stage > 0) receives its carried inputs from the previous stage in a
  forward pre-hook; the first block of the next stage (stage < last) sends them from a pre-hook — after
  any code the model runs between blocks (ControlNet residuals), so what travels is exactly what that
  block would have received on one device;
* everything outside the blocks (embeddings, final norm and projection) runs on every rank: it is cheap,
  and it keeps the model's own code in charge of shapes.

A denoising step is ``M`` transformer passes, one per patch of the image tokens (split by the plan's own
split points, patch ``p`` of ``M`` instead of rank ``r`` of ``W``); the ``Gather`` module's output is
assembled locally, and the last stage's output is sent to every stage once per step. The first
``stale_warmup_steps`` steps are one synchronous pass over the whole image.

The pipeline drains at the end of every step: the scheduler runs outside the transformer, on the whole
latent, so step ``t + 1`` cannot start before step ``t``'s last patch. The bubble is ``(W - 1) / (M + W - 1)``
of a step (xDiT avoids it by stepping the scheduler per patch inside its own denoising loop).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from ...parallel.pipefusion import PatchSlot
from .plans import Stages, resolve_paths

#: pipefusion_text="first": the patch pass of each step that runs the joint text (and whose stream carries it)
TEXT_PASS = 0

__all__ = ["StageRuntime", "partition_blocks", "ReleasedWeightsError"]


class ReleasedWeightsError(ValueError):
    """A transformer whose other stages' weights pipefusion released was used without it."""


def partition_blocks(weights: list[int], stages: int) -> list[int]:
    """Stage boundaries ``[0, b_1, ..., len(weights)]``: contiguous, each stage >= 1 block, balanced so the
    heaviest stage is as light as possible (exact by binary search over the heaviest stage's weight)."""
    n = len(weights)
    if stages > n:
        raise ValueError(f"pipefusion: {stages} stages need at least {stages} transformer blocks, the model has {n}; "
                         f"use fewer ranks")

    def cuts(limit):
        out, acc = [0], 0
        for i, w in enumerate(weights):
            if acc + w > limit and acc > 0:
                out.append(i)
                acc = 0
            acc += w
        return out

    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(cuts(mid)) <= stages:
            hi = mid
        else:
            lo = mid + 1
    bounds = cuts(lo)
    # fewer stages than asked (light tail): split the largest stages further so every rank gets a block
    while len(bounds) < stages:
        spans = [(bounds[i + 1] if i + 1 < len(bounds) else n) - bounds[i] for i in range(len(bounds))]
        i = max(range(len(spans)), key=lambda j: spans[j])
        bounds.insert(i + 1, bounds[i] + spans[i] // 2)
    return bounds + [n]


def _params(module) -> list[str]:
    return list(inspect.signature(type(module).forward).parameters)[1:]


class StageRuntime:
    """This rank's stage of one transformer: which blocks it runs, and the hooks that move patches."""

    def __init__(self, rt, stages: Stages):
        self.rt, self.ctx, self.spec = rt, rt.ctx, stages
        model, ctx = rt.model, rt.ctx
        self.blocks: list[tuple[str, object, tuple]] = []  # (name, module, what it returns)
        for path in stages.blocks:
            for name, module in resolve_paths(model, path + ".*"):
                self.blocks.append((name, module, stages.returns_of(path)))
        weights = [sum(p.numel() for p in m.parameters()) for _, m, _ in self.blocks]
        self.bounds = partition_blocks(weights, ctx.stages)
        s = ctx.stage
        self.first, self.end = self.bounds[s], self.bounds[s + 1]
        self.params_total = sum(p.numel() for p in model.parameters())
        self.joint_names = tuple(n for n in stages.carry if n in rt.plan.joint_tokens)
        self.text_dims = dict(stages.text) if isinstance(stages.text, Mapping) else {n: -2 for n in stages.text}
        mode = ctx.config.pipefusion_text
        if mode == "first" and self.joint_names and not self.text_dims:
            raise ValueError(f"pipefusion_text='first': plan {rt.plan.name!r} names no text inputs (Stages.text) to cut "
                             f"from the earlier patch passes; use pipefusion_text='every' or add them to the plan")
        # text in the first pass only: the default wherever the plan says where the text is
        self.text_once = bool(self.joint_names and self.text_dims) and mode != "every"
        self._undo: list = []
        self.released: list[str] = []
        self.shapes: dict = {}  # boundary -> (rows, channels, dtype) of one patch payload (codec="auto")
        self.decided = False

    # -- installation --------------------------------------------------------------------------
    def install(self) -> None:
        s, last = self.ctx.stage, self.ctx.stages - 1
        for i, (name, module, returns) in enumerate(self.blocks):
            if not self.first <= i < self.end:
                self.rt._wrap_forward(module, _passthrough(module, returns))
        if s > 0:
            name, module, _ = self.blocks[self.first]
            self._undo.append(module.register_forward_pre_hook(self._hook(module, "recv", s - 1),
                                                               with_kwargs=True).remove)
        if s < last:
            name, module, _ = self.blocks[self.end]
            self._undo.append(module.register_forward_pre_hook(self._hook(module, "send", s),
                                                               with_kwargs=True).remove)

    def release(self) -> None:
        """Free the other stages' weights (moved to ``meta``): this rank then holds only its stage."""
        for i, (name, module, _) in enumerate(self.blocks):
            if not self.first <= i < self.end:
                module.to("meta")
                self.released.append(name)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if self.released:  # the model cannot run whole any more: say so instead of failing on meta tensors
            names = f"{self.released[0]} .. {self.released[-1]}"
            model = self.rt.model

            def refuse(module, args, kwargs):
                raise ReleasedWeightsError(
                    f"{type(model).__name__} ran as a pipefusion stage and released the weights of the other "
                    f"stages' blocks ({names}); load the model again to run it whole or with another strategy")
            model.register_forward_pre_hook(refuse, with_kwargs=True)

    def stats(self) -> dict:
        local = sum(p.numel() for p in self.rt.model.parameters() if not p.is_meta)
        return {"stage": self.ctx.stage, "stages": self.ctx.stages, "patches": self.ctx.num_patches,
                "blocks": [self.blocks[self.first][0], self.blocks[self.end - 1][0]],
                "num_blocks": self.end - self.first, "params": int(local), "params_total": int(self.params_total)}

    # -- boundary hooks ------------------------------------------------------------------------
    def _hook(self, module, kind: str, boundary: int):
        params = _params(module)
        carry = self.spec.carry

        def hook(mod, args, kwargs):
            call = self.rt.call
            if call is None:
                return None
            args = list(args)
            found = {}
            for name in carry:
                pos = params.index(name) if name in params else None
                if name in kwargs:
                    v = kwargs[name]
                elif pos is not None and pos < len(args):
                    v = args[pos]
                else:
                    v = None
                if isinstance(v, torch.Tensor):
                    found[name] = v
            if not found:
                raise ValueError(f"pipefusion plan {self.rt.plan.name!r}: block {type(mod).__name__} got none of the "
                                 f"carried inputs {list(carry)}")
            slot = self.ctx.patch
            self._record(boundary, found, slot)
            got = self._transfer(kind, boundary, found, slot, call)
            if got is None:
                return None
            for name, v in got.items():
                pos = params.index(name) if name in params else None
                if name in kwargs or pos is None or pos >= len(args):
                    kwargs[name] = v
                else:
                    args[pos] = v
            return tuple(args), kwargs
        return hook

    def _transfer(self, kind: str, boundary: int, found: dict, slot, call) -> dict | None:
        """Send (None) or receive this pass's carried tensors. A batch of several requests
        (``set_request_batches``) travels as one set of boundary streams per request, on the request's own
        branch (the branch its attention's K/V buffers live on), so a request's bytes and reconstruction never
        depend on the requests batched with it."""
        batch = next(iter(found.values())).shape[0]
        index = self.rt.request_index(batch, next(iter(found.values())).device)
        if index is None:
            self.ctx.use_branch(call.ns)
            if kind == "send":
                return self.ctx.strategy.send(boundary, found, slot, call.stream_step, self.joint_names)
            return self.ctx.strategy.recv(boundary, found, slot, call.stream_step, self.joint_names)
        odd = [n for n, x in found.items() if x.shape[0] != batch]
        if odd:
            raise ValueError(f"pipefusion plan {self.rt.plan.name!r}: carried input(s) {odd} have no batch dimension "
                             f"of {batch}, so a batch of requests cannot be split at the boundary; run one request "
                             f"per call")
        out = {n: torch.empty_like(x) for n, x in found.items()} if kind == "recv" else None
        for r, rows in enumerate(index):  # the same request order on both sides of the pair link
            self.ctx.use_branch((call.ns, "request", r))
            part = {n: x[rows] for n, x in found.items()}
            if kind == "send":
                self.ctx.strategy.send(boundary, part, slot, call.stream_step, self.joint_names)
            else:
                for n, x in self.ctx.strategy.recv(boundary, part, slot, call.stream_step, self.joint_names).items():
                    out[n][rows] = x
        self.ctx.use_branch(call.ns)
        return out

    def _record(self, boundary: int, found: dict, slot) -> None:
        if boundary in self.shapes or slot is None:
            return
        size = self.ctx.patch_sizes(slot.total)[0] if slot.count == 1 else slot.size
        rows = sum(int(x.shape[0]) * (int(x.shape[1]) if n in self.joint_names else size) for n, x in found.items())
        cols = max(int(x[0, 0].numel()) for x in found.values())
        self.shapes[boundary] = (rows, cols, str(next(iter(found.values())).dtype).removeprefix("torch."))

    def decide_auto(self, device) -> None:
        """codec="auto": every boundary's codec, chosen by every rank alike after the synchronous step(s).

        Each rank saw the payload shapes of its own boundaries; one control exchange gives every rank all
        of them, then each boundary is decided in order (the controller's timings are agreed collectively)."""
        self.decided = True
        auto = self.ctx.auto
        if auto is None or self.ctx.stages == 1:
            return
        tables = self.ctx.world_comm.all_gather_object({str(b): list(v) for b, v in self.shapes.items()})
        shapes = {}
        for t in tables:
            for b, v in t.items():
                shapes.setdefault(int(b), v)
        for b in sorted(shapes):
            rows, cols, dtype = shapes[b]
            auto.ensure(b, (rows, cols), getattr(torch, dtype), device, messages=1, encodes=1)

    # -- the step ------------------------------------------------------------------------------
    def without_text(self, arguments: dict) -> dict:
        """The model inputs of a patch pass without the joint text: every text input cut to zero tokens."""
        out = dict(arguments)
        for name, dim in self.text_dims.items():
            x = out.get(name)
            if isinstance(x, torch.Tensor) and x.ndim >= 2:
                out[name] = x.narrow(dim, 0, 0)
        return out

    def slot_for(self, call, total: int) -> PatchSlot:
        """The patch a split of ``total`` tokens gives this pass (and records it for attention)."""
        p, m = call.part
        sizes = self.ctx.patch_sizes(total) if m > 1 else [total]
        off = sum(sizes[:p])
        slot = PatchSlot(p, off, sizes[p], total, m, call.text, TEXT_PASS if self.text_once else None)
        prev = self.ctx.patch
        if prev is not None and prev.total != total:
            raise ValueError(f"pipefusion plan {self.rt.plan.name!r} splits two token sets ({prev.total} and {total} "
                             f"tokens) in one pass; pipefusion needs one split token set (keep the text whole)")
        self.ctx.patch = slot
        return slot

    def output(self, out, step: int):
        """Send the last stage's output of this step to every stage (replaces the tensor in ``out``)."""
        self.ctx.finish_sends()  # every branch's: a batch of requests sent on one branch per request

        def bc(t):
            return self.ctx.strategy.broadcast_output(t, step)
        if isinstance(out, tuple):
            return (bc(out[0]),) + tuple(out[1:])
        if hasattr(out, "sample"):
            out.sample = bc(out.sample)
            return out
        return bc(out)


def _passthrough(module, returns: tuple):
    """A forward for a block of another stage: its carried inputs back, in the block's output order."""
    sig = inspect.signature(type(module).forward.__get__(module))

    def forward(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        vals = [bound.arguments.get(n) for n in returns]
        return vals[0] if len(vals) == 1 else tuple(vals)
    return forward
