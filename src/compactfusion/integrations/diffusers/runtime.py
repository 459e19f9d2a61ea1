"""Runtime of a parallelized diffusers model: plan hooks, attention routing, steps and branches.

One :class:`TransformerRuntime` per parallelized transformer reads its :class:`FamilyPlan`: inputs of
the transformer itself are split inside its forward wrapper (after the CFG split), inputs and outputs of
submodules by forward hooks, and the ``Gather`` module's output is all-gathered. Between the first split
and the gather ("the sharded region") every self-attention module runs under an
:class:`AttentionRouter`; each must route at least one call, or the forward raises.

Steps and branches: a denoising step is not a transformer call. A call whose ``timestep`` differs from
the previous call's starts a new step; calls that share it are branches of that step (conditional,
unconditional, skip-layer guidance, ...). Each (transformer, branch) — and, with request batching, each
request — has its own residual streams, and counts its own steps, so its warmup runs on its first step
and it is never coded against another branch's activations.

Everything lives on the runtime objects (no module-level state) and is reset per generation: by the
pipeline's ``__call__`` (see :func:`install_pipeline_class`) or by ``compactfusion.reset`` for a bare
transformer.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
import types
from dataclasses import dataclass, field

import torch

from ...parallel.errors import ConfigMismatchError
from .guards import check_finite, check_ranks_agree, generator_fingerprint, tensor_digest
from .pipeline import TEXT_PASS, ReleasedWeightsError
from .plans import FamilyPlan, Gather, Split, is_cross_attention, resolve_paths, unwrap_model
from .router import AttentionRouter, UnroutedAttentionError, UnsupportedAttentionError, backend_of, check_backend

#: Test-only hooks, inert unless set (documented in docs/reliability.md). ``COMPACTFUSION_TEST_STEP_FILE``:
#: each denoising step writes "PID STEP" to this path ("{rank}" in it is replaced by the global rank;
#: without it only rank 0 writes), so a test can see that a generation is underway and which PID is which
#: rank. ``COMPACTFUSION_TEST_FAIL_AT="RANK:STEP"``: that rank raises RuntimeError at that step.
STEP_FILE_ENV = "COMPACTFUSION_TEST_STEP_FILE"
FAIL_AT_ENV = "COMPACTFUSION_TEST_FAIL_AT"


class InjectedFailure(RuntimeError):
    """Raised by the ``COMPACTFUSION_TEST_FAIL_AT`` test hook."""


def _test_hook(rank: int):
    """The env-gated per-step test hook for this rank, or None (the normal case: zero cost)."""
    step_file, fail_at = os.environ.get(STEP_FILE_ENV), os.environ.get(FAIL_AT_ENV)
    if not step_file and not fail_at:
        return None
    path = None
    if step_file and ("{rank}" in step_file or rank == 0):
        path = step_file.replace("{rank}", str(rank))
    fail_step = None
    if fail_at:
        r, _, s = fail_at.partition(":")
        if int(r) == rank:
            fail_step = int(s)

    def hook(step: int) -> None:
        if path:
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()} {step}\n")
            os.replace(tmp, path)  # atomic: a reader never sees a half-written marker
        if step == fail_step:
            raise InjectedFailure(f"test hook {FAIL_AT_ENV}: injected failure on rank {rank} at step {step}")
    return hook


def _short(v) -> str:
    """A readable value for mismatch messages (long values are shown as a digest)."""
    text = repr(v)
    return text if len(text) <= 48 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _digest(parts: dict) -> str:
    return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:16]


def is_attention(module) -> bool:
    """diffusers attention modules (``Attention``, ``AttentionModuleMixin`` subclasses) carry a processor."""
    return hasattr(module, "processor") and hasattr(module, "set_processor")


def _forward_params(module) -> list[str]:
    params = list(inspect.signature(type(module).forward).parameters)
    return params[1:]  # drop self


@dataclass
class _Call:
    """What one transformer forward has split, routed and gathered so far."""

    splits: list = field(default_factory=list)  # (local length, total length) of every split token dim
    sharded: bool = False
    gathered: bool = False
    ns: object = None
    stream_step: int = 0
    joint_tokens: int = 0  # replicated tokens in each self-attention call (plans with ``joint``)
    part: tuple = (0, 1)  # pipefusion: (patch, patches of this step); splits take patch p of M, not rank r of W
    text: bool = True  # pipefusion: this pass holds the joint text (False: cut to 0 tokens, its K/V buffered)

    def local_sums(self) -> set:
        """Token counts a routed call may hold: sums of distinct split lengths (e.g. text shard + image shard)."""
        sums = {0}
        for n, _ in set(self.splits):  # one entry per distinct (local, total) token set
            sums |= {s + n for s in sums}
        return sums


class TransformerRuntime:
    """The hooks on one transformer and its per-generation step/branch state."""

    def __init__(self, owner: "ModelRuntime", transformer, plan: FamilyPlan, index: int, name: str):
        self.owner, self.ctx, self.plan, self.index, self.name = owner, owner.ctx, plan, index, name
        self.model = unwrap_model(transformer)
        released = [n for n, p in self.model.named_parameters() if p.is_meta]
        if released:  # e.g. left by an earlier pipefusion stage: refuse by name before any hook or agreement
            raise ReleasedWeightsError(
                f"{name} ({type(self.model).__name__}) has {len(released)} weight tensor(s) on the meta device "
                f"(first: {released[0]}), e.g. released by an earlier strategy='pipefusion' run; load the model "
                f"again before parallelizing it")
        self._undo: list = []
        self._params = _forward_params(self.model)
        self._signature = inspect.signature(type(self.model).forward.__get__(self.model))  # without self
        self.call: _Call | None = None
        self.attention_layers = 0
        self.self_attention_layers = 0
        self.pipe = None  # StageRuntime under strategy="pipefusion"
        self._pipe_out = None  # pipefusion: the step's output assembled patch by patch
        # pipefusion releases other stages' weights: sample them for the agreement while all are here
        self.weights_sample = _weights_sample(self.model) if self.ctx.pipeline else None
        self.reset()
        try:
            self._install()
        except Exception:
            self.remove()
            raise
        if self.pipe is not None:
            self.pipe.release()

    # -- per generation ------------------------------------------------------------------------
    def reset(self) -> None:
        self.step = -1               # denoising step index of this transformer in this generation
        self.branch = 0              # call index within the step
        self._timestep = None
        self._stream_steps: dict = {}  # branch -> steps that branch has run
        self.calls = 0
        if getattr(self, "pipe", None) is not None:  # boundary shapes and auto decisions are per generation
            self.pipe.shapes.clear()
            self.pipe.decided = False

    # -- installation --------------------------------------------------------------------------
    def _install(self) -> None:
        m, plan = self.model, self.plan
        self._top = plan.plan.get("", {}) if not isinstance(plan.plan.get(""), Gather) else {}
        for name in self._top:
            if isinstance(name, int) or name not in self._params:
                raise ValueError(f"plan {plan.name!r} splits input {name!r}, but {type(m).__name__}.forward has "
                                 f"no such argument (it takes {', '.join(self._params)})")
        gathers = 0
        for path, entry in plan.plan.items():
            for mod_name, module in resolve_paths(m, path):
                if isinstance(entry, Gather):
                    gathers += 1
                    self._undo.append(module.register_forward_hook(self._gather_hook(entry, mod_name)).remove)
                    continue
                inputs = {k: s for k, s in entry.items() if isinstance(k, str)}
                outputs = {k: s for k, s in entry.items() if isinstance(k, int)}
                if path == "":
                    if outputs:
                        raise ValueError(f"plan {plan.name!r}: the transformer's own outputs cannot be split")
                    continue
                if inputs:
                    params = _forward_params(module)
                    missing = [k for k in inputs if k not in params]
                    if missing:
                        raise ValueError(f"plan {plan.name!r}: module {mod_name!r} ({type(module).__name__}) has no "
                                         f"forward argument {missing[0]!r}")
                    self._undo.append(module.register_forward_pre_hook(
                        self._input_hook(inputs, params, mod_name), with_kwargs=True).remove)
                if outputs:
                    self._undo.append(module.register_forward_hook(self._output_hook(outputs, mod_name)).remove)
        layer = 0
        for mod_name, module in m.named_modules():
            if not is_attention(module):
                continue
            cross = is_cross_attention(plan, mod_name)
            if not cross:
                check_backend(module, mod_name)  # refuse unroutable backends now, and again at every call
                self.self_attention_layers += 1
            self._wrap_forward(module, self._attention_forward(module, module.forward, layer, mod_name, cross))
            layer += 1
        if self.self_attention_layers == 0:
            raise ValueError(f"{type(m).__name__} has no diffusers self-attention modules to parallelize")
        self.attention_layers = layer
        if self.ctx.pipeline:
            if plan.stages is None:
                raise ValueError(f"strategy 'pipefusion' needs pipeline stages in the plan, and plan {plan.name!r} "
                                 f"({type(m).__name__}) has none; built-in stages: flux, wan, sd3 (or give "
                                 f"FamilyPlan(stages=Stages(...)) via ParallelConfig(plan=...))")
            from .pipeline import StageRuntime
            self.pipe = StageRuntime(self, plan.stages)
            self.pipe.install()
        self._wrap_forward(m, self._transformer_forward(m.forward))

    def _wrap_forward(self, module, new_forward) -> None:
        had = "forward" in module.__dict__
        old = module.__dict__.get("forward")
        module.forward = new_forward

        def undo():
            if had:
                module.forward = old
            else:
                module.__dict__.pop("forward", None)
        self._undo.append(undo)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if self.pipe is not None:
            self.pipe.remove()
            self.pipe = None

    # -- splitting -----------------------------------------------------------------------------
    def _split(self, x, spec: Split, what: str):
        """This rank's shard of ``x`` (a tensor, or a list/tuple of tensors split element by element)."""
        if isinstance(x, (list, tuple)):
            return type(x)(self._split(t, spec, f"{what}[{i}]") for i, t in enumerate(x))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"plan {self.plan.name!r}: {what} is {type(x).__name__}, expected a tensor to split")
        if spec.optional and (x.ndim != spec.ndim or x.shape[spec.dim % x.ndim] == 1):
            return x  # e.g. a per-sample timestep where the plan also allows a per-token one
        if x.ndim != spec.ndim:
            raise ValueError(f"plan {self.plan.name!r}: {what} has shape {tuple(x.shape)} but the plan splits a "
                             f"{spec.ndim}-D tensor along dim {spec.dim}; pass inputs in the layout the model "
                             f"expects, or give ParallelConfig(plan=...) for this layout")
        dim = spec.dim % x.ndim
        if spec.mask and not bool((x != 0).all()):
            # Decided on the full mask, so every rank refuses together (a shard-local decision would not be).
            raise UnsupportedAttentionError(
                f"plan {self.plan.name!r}: {what} masks some tokens (padded text); masks over sharded tokens are not "
                f"supported by the sequence-parallel strategies: pass one prompt per call, or prompts without padding")
        total = int(x.shape[dim])
        call = self.call
        if call is None:
            raise UnroutedAttentionError(f"plan {self.plan.name!r}: {what} was split outside a forward of "
                                         f"{type(self.model).__name__}; call the transformer, not its submodules")
        if self.pipe is not None:  # patch p of this step's M, on every stage alike
            if total < self.ctx.num_patches:
                raise ValueError(f"plan {self.plan.name!r}: {what} has {total} tokens, fewer than the "
                                 f"{self.ctx.num_patches} pipefusion patches; use a larger image or fewer patches")
            slot = self.pipe.slot_for(call, total)
            local = x.narrow(dim, slot.offset, slot.size)
        elif total < self.ctx.seq_world:  # decided on the global length: every rank refuses together
            raise ValueError(f"plan {self.plan.name!r}: {what} has {total} tokens, which cannot be split over "
                             f"{self.ctx.seq_world} sequence-parallel ranks; use a larger image or fewer ranks")
        else:
            local = self.ctx.shard_seq(x, dim)
        call.sharded = True
        call.splits.append((int(local.shape[dim]), total))
        return local

    def _input_hook(self, inputs: dict, params: list, mod_name: str):
        def hook(module, args, kwargs):
            if self.call is None:
                return None
            args = list(args)
            for name, spec in inputs.items():
                pos = params.index(name)
                if name in kwargs:
                    if kwargs[name] is not None:
                        kwargs[name] = self._split(kwargs[name], spec, f"{mod_name}({name}=...)")
                elif pos < len(args) and args[pos] is not None:
                    args[pos] = self._split(args[pos], spec, f"{mod_name}({name}=...)")
            return tuple(args), kwargs
        return hook

    def _output_hook(self, outputs: dict, mod_name: str):
        def hook(module, args, output):
            if self.call is None:
                return None
            single = isinstance(output, torch.Tensor)
            items = [output] if single else list(output)
            for index, spec in outputs.items():
                if index >= len(items):
                    raise ValueError(f"plan {self.plan.name!r}: {mod_name!r} returned {len(items)} output(s), the "
                                     f"plan splits output {index}")
                items[index] = self._split(items[index], spec, f"{mod_name} output {index}")
            return items[0] if single else type(output)(items)
        return hook

    def _gather_hook(self, spec: Gather, mod_name: str):
        def hook(module, args, output):
            call = self.call
            if call is None or not call.sharded:
                return None
            x = output if spec.index is None else output[spec.index]
            if not isinstance(x, torch.Tensor) or x.ndim != spec.ndim:
                raise ValueError(f"plan {self.plan.name!r}: {mod_name!r} returned "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}, the plan "
                                 f"gathers a {spec.ndim}-D tensor along dim {spec.dim}")
            dim = spec.dim % x.ndim
            if self.pipe is not None:  # pipefusion: patches are assembled locally, nothing travels
                full = self._assemble(x, dim, call)
            else:
                # One split token set: every rank derives the sizes from the split rule. Several (text and
                # image): which one reached the gather is not known, so exchange sizes — a choice every rank
                # makes alike, since the totals are global (a choice by this rank's own length would not be).
                totals = {t for _, t in call.splits}
                total = totals.pop() if len(totals) == 1 else None
                full = self.ctx.gather_seq(x, dim, step=call.stream_step, total=total)
            call.gathered, call.sharded = True, False
            if spec.index is None:
                return full
            out = list(output)
            out[spec.index] = full
            return type(output)(out)
        return hook

    def _assemble(self, x, dim: int, call):
        """pipefusion: this pass's patch written into the step's whole output (complete after the last patch)."""
        slot = self.ctx.patch
        if slot is None or slot.count == 1:
            return x
        shape = list(x.shape)
        shape[dim] = slot.total
        buf = self._pipe_out
        if slot.index == 0 or buf is None or list(buf.shape) != shape or buf.dtype != x.dtype:
            buf = self._pipe_out = x.new_zeros(shape)
        buf.narrow(dim, slot.offset, slot.size).copy_(x)
        return buf

    # -- attention -----------------------------------------------------------------------------
    def _attention_forward(self, module, original, layer: int, mod_name: str, cross: bool):
        runtime = self

        def forward(*args, **kwargs):
            call = runtime.call
            if call is None or not call.sharded or cross:
                return original(*args, **kwargs)
            check_backend(module, mod_name)  # set_attention_backend may have run after parallelize
            router = AttentionRouter(runtime, layer, mod_name)
            with router:
                out = original(*args, **kwargs)
            if router.routed == 0:
                raise UnroutedAttentionError(
                    f"self-attention module {mod_name!r} of {type(runtime.model).__name__} attended without reaching "
                    f"the parallel context (backend {backend_of(module)!r}); its output would use only this rank's "
                    f"tokens. Use the native attention backend, or mark the module as cross-attention in the plan "
                    f"if its keys are not sharded")
            return out
        return forward

    def joint_layout(self, sq: int, where: str) -> tuple[int, str]:
        """(replicated joint tokens in this call, their position); checks the call holds sharded tokens only."""
        call, plan = self.call, self.plan
        sums = call.local_sums()
        n = call.joint_tokens
        if plan.joint and n and sq - n in sums and sq - n > 0:
            return n, plan.joint
        if sq in sums:
            return 0, "none"
        raise UnroutedAttentionError(
            f"{where}: {sq} query tokens match no combination of this rank's split token counts "
            f"{sorted(sums - {0})}" + (f" plus {n} replicated tokens" if plan.joint else "") +
            f"; the plan {plan.name!r} does not split every token this attention sees")

    def request_index(self, batch: int, device) -> list | None:
        """Batch rows of each request of a batched call (``set_request_batches``), or None when unbatched.

        The pipeline may repeat the images per call (e.g. CFG's unconditional half first): request ``r``
        owns rows ``j * n + offset_r + i`` of every repeat ``j``."""
        sizes = self.owner.request_rows
        if not sizes or len(sizes) == 1:
            return None
        n = sum(sizes)
        if batch % n:
            raise ValueError(f"request batches {list(sizes)} ({n} images) do not divide the transformer batch "
                             f"{batch}; pass set_request_batches sizes that add up to the images per call")
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        return [torch.tensor([j * n + off + i for j in range(batch // n) for i in range(size)], device=device)
                for off, size in zip(offsets, sizes)]

    def route(self, q, k, v, layer: int, joint=None):
        """Parallel attention of one routed SDPA call (B, S_local, H, D), per request when batched.

        ``joint``: replicated (q, k, v) tokens; then returns ``(out, joint_out)``.
        """
        call = self.call
        index = self.request_index(q.shape[0], q.device)
        if index is None:
            jkw = {} if joint is None else dict(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2])
            return self.ctx.attention(q, k, v, layer=layer, step=call.stream_step, branch=call.ns, **jkw)
        out = torch.empty_like(q)
        jout = None if joint is None else torch.empty_like(joint[0])
        for r, rows in enumerate(index):
            kw = {} if joint is None else dict(joint_q=joint[0][rows], joint_k=joint[1][rows], joint_v=joint[2][rows])
            res = self.ctx.attention(q[rows], k[rows], v[rows], layer=layer, step=call.stream_step,
                                     branch=(call.ns, "request", r), **kw)
            if joint is None:
                out[rows] = res
            else:
                out[rows], jout[rows] = res
        return out if joint is None else (out, jout)

    # -- the transformer call ------------------------------------------------------------------
    def _advance(self, arguments: dict) -> None:
        """New step or new branch of the current step, from the call's ``timestep``."""
        t = arguments.get("timestep")
        t = t.detach() if isinstance(t, torch.Tensor) else t
        same = (self._timestep is not None and t is not None and isinstance(t, torch.Tensor)
                and isinstance(self._timestep, torch.Tensor) and t.shape == self._timestep.shape
                and t.device == self._timestep.device and bool(torch.equal(t, self._timestep)))
        if same or (t is not None and not isinstance(t, torch.Tensor) and t == self._timestep):
            self.branch += 1
        else:
            if self.owner.bare and self._went_back(t):
                self.owner.reset()  # a bare transformer whose timestep rose again: a new generation
            self.step += 1
            self.branch = 0
            self.owner.on_step()
        self._timestep = t.clone() if isinstance(t, torch.Tensor) else t

    def _went_back(self, t) -> bool:
        prev = self._timestep
        if prev is None or t is None:
            return False
        try:
            return float(torch.as_tensor(t).float().mean()) > float(torch.as_tensor(prev).float().mean())
        except (TypeError, ValueError, RuntimeError):
            return False

    def _transformer_forward(self, original):
        runtime = self

        def forward(*args, **kwargs):
            if getattr(runtime.model, "_compiled_call_impl", None) is not None:
                raise ValueError(f"{runtime.name} was compiled whole (.compile()) after compactfusion.parallelize; "
                                 f"whole-model compilation is not supported: compile its repeated blocks instead "
                                 f"({runtime.name}.compile_repeated_blocks(), before or after parallelize)")
            if runtime.call is not None:
                raise RuntimeError(f"{type(runtime.model).__name__} was called re-entrantly while parallelized")
            bound = runtime._signature.bind(*args, **kwargs)
            arguments = bound.arguments  # edits write through to bound.args / bound.kwargs
            runtime.owner.before_call(runtime, arguments)
            runtime._advance(arguments)
            branch = runtime.branch
            count = runtime._stream_steps.get(branch, 0)
            runtime._stream_steps[branch] = count + 1
            ns = (runtime.index, branch)
            call = _Call(ns=None if ns == (0, 0) else ns, stream_step=count)
            if runtime.plan.joint:
                call.joint_tokens = sum(int(x.shape[1]) for x in (arguments.get(n) for n in runtime.plan.joint_tokens)
                                        if isinstance(x, torch.Tensor) and x.ndim >= 2)
            ctx = runtime.ctx
            if ctx.cfg_world > 1:
                runtime._split_cfg(arguments)
            if runtime.pipe is not None:
                out = runtime._pipeline_step(original, bound, call)
            else:
                out = runtime._pass(original, bound, call)
            runtime.calls += 1
            if ctx.cfg_world > 1:
                out = runtime._gather_cfg(out)
            return out
        # Dynamo must not trace the step/branch bookkeeping and collectives: a whole-model torch.compile
        # wrapper around the parallelized transformer then runs it eagerly (exact); compiled blocks inside
        # (compile_repeated_blocks) stay compiled, with graph breaks at the routed attention calls.
        return torch.compiler.disable(forward)

    def _pass(self, original, bound, call: _Call):
        """One forward of the model as ``call``: the plan's top-level splits applied to ``bound``, then checked."""
        self.call = call
        try:
            for name, spec in self._top.items():
                if bound.arguments.get(name) is not None:
                    bound.arguments[name] = self._split(bound.arguments[name], spec, f"input {name}")
            out = original(*bound.args, **bound.kwargs)
            self._check_call(call)
        finally:
            self.call = None
        return out

    def _pipeline_step(self, original, bound, first: _Call):
        """pipefusion: one denoising step's passes (one per patch; one whole pass while synchronous)."""
        ctx = self.ctx
        sync = first.stream_step < ctx.config.stale_warmup_steps
        m = 1 if sync else ctx.num_patches
        if not sync and not self.pipe.decided:  # codec="auto" decides each boundary once its shapes are known
            hs = bound.arguments.get("hidden_states")
            self.pipe.decide_auto(hs.device if isinstance(hs, torch.Tensor) else torch.device("cpu"))
        ctx.use_branch(first.ns)
        out = None
        self._pipe_out = None
        for p in range(m):
            text = not self.pipe.text_once or p == TEXT_PASS  # one pass of a step runs the text
            arguments = dict(bound.arguments) if text else self.pipe.without_text(bound.arguments)
            call = _Call(ns=first.ns, stream_step=first.stream_step, joint_tokens=first.joint_tokens if text else 0,
                         part=(p, m), text=text)
            ctx.patch = None
            out = self._pass(original, inspect.BoundArguments(bound.signature, arguments), call)
        ctx.use_branch(first.ns)
        out = self.pipe.output(out, first.stream_step)
        ctx.patch = None
        self._pipe_out = None
        return out

    def _check_call(self, call: _Call) -> None:
        if not call.splits:
            raise UnroutedAttentionError(
                f"plan {self.plan.name!r} split nothing in this forward of {type(self.model).__name__} (its split "
                f"points were not reached or their inputs were None); every rank would compute the whole sequence "
                f"and the output could not be gathered. Fix the plan for this model")
        if not call.gathered:
            raise UnroutedAttentionError(
                f"plan {self.plan.name!r}: the output module was never called in this forward of "
                f"{type(self.model).__name__}, so the output stayed split across ranks; fix the plan's Gather entry")

    # -- CFG parallel --------------------------------------------------------------------------
    def _split_cfg(self, arguments: dict) -> None:
        hs = arguments.get("hidden_states")
        if not isinstance(hs, torch.Tensor):
            raise ValueError("cfg_parallel needs the transformer's `hidden_states` input to find the batch")
        batch = hs.shape[0]
        if batch % 2:
            raise ValueError(f"cfg_parallel needs the pipeline to batch the conditional and unconditional inputs in "
                             f"one transformer call, but it got batch {batch} (guidance off, or a pipeline that calls "
                             f"the transformer once per branch, like Wan or true CFG); turn cfg_parallel off and use "
                             f"sequence parallelism over all ranks")
        half, r = batch // 2, self.ctx.cfg_rank
        # position ids (Flux's img_ids/txt_ids: tokens along dim 0) are not batched
        token_dim0 = {n for n, s in self._top.items() if s.dim % s.ndim == 0} | {n for n in arguments if n.endswith("_ids")}

        def split(v):
            if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch:
                return v[r * half:(r + 1) * half]
            if isinstance(v, dict):
                return {k: split(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
                return type(v)(split(x) for x in v)
            return v
        names = self.plan.batch_args or [n for n in arguments if n not in token_dim0]
        for name in names:
            if name in arguments:
                arguments[name] = split(arguments[name])

    def _gather_cfg(self, out):
        if isinstance(out, tuple):
            return (self.ctx.gather_cfg(out[0], 0),) + tuple(out[1:])
        if hasattr(out, "sample"):
            out.sample = self.ctx.gather_cfg(out.sample, 0)
            return out
        return self.ctx.gather_cfg(out, 0)


class ModelRuntime:
    """Owns the context and the transformer runtimes of one parallelized pipeline or bare transformer."""

    def __init__(self, obj, transformers: list, plans: list, ctx, config, bare: bool):
        self.obj, self.ctx, self.config, self.bare = obj, ctx, config, bare
        self.last_stats: dict | None = None
        self.generations = 0
        self.request_rows: list | None = None
        self._hook = _test_hook(getattr(ctx, "rank", 0))
        self._pending_agreement = bare
        self._step = -1
        self.transformers: list[TransformerRuntime] = []
        try:
            for i, ((name, t), plan) in enumerate(zip(transformers, plans)):
                self.transformers.append(TransformerRuntime(self, t, plan, i, name))
        except Exception:
            self.remove()
            raise

    @property
    def step(self) -> int:
        """The denoising step index of this generation (-1 before the first), over all its transformers."""
        return self._step

    @property
    def num_attention_layers(self) -> int:
        return sum(t.attention_layers for t in self.transformers)

    def on_step(self) -> None:
        """A transformer started a new step (Wan 2.2: one transformer per step, each counting its own)."""
        self._step += 1
        if self._hook is not None:
            self._hook(self._step)

    def before_call(self, rt: TransformerRuntime, arguments: dict) -> None:
        if self._pending_agreement:  # bare transformer: agree on the first call of each generation
            self._pending_agreement = False
            parts = self.model_parts()
            for k, v in sorted(arguments.items()):
                if isinstance(v, torch.Tensor):
                    parts[f"input {k}"] = f"tensor {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
            self.check_parts(parts)

    def remove(self) -> None:
        for t in self.transformers:
            t.remove()

    # -- generations ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.ctx.reset()
        for t in self.transformers:
            t.reset()
        self._step = -1
        self._pending_agreement = self.bare

    def begin_generation(self, call_args: dict) -> None:
        self.reset()
        parts = self.fingerprint_parts(call_args)
        self.check_parts(parts)

    def check_parts(self, parts: dict) -> None:
        try:
            self.ctx.check_agreement(_digest(parts))
        except ConfigMismatchError as e:  # every rank got the same verdict, so all are here
            raise self._explain_mismatch(e, parts) from None

    def end_generation(self) -> None:
        self.generations += 1
        self.last_stats = self.summary()

    def summary(self) -> dict:
        s = self.ctx.summary()
        # Flat keys for cf.stats(): the ledger totals, and the residual state still held after the call
        # (bases of every stream, sender and receiver sides; freed at the start of the next call).
        for k, v in (s.get("ledger") or {}).items():
            s.setdefault(k, v)
        s.setdefault("state_bytes", int(self.ctx.state_nbytes()))
        s.update(steps=self.step + 1, attention_layers=self.num_attention_layers, generation=self.generations,
                 transformer_calls=sum(t.calls for t in self.transformers),
                 plans={t.name: t.plan.name for t in self.transformers})
        stages = {t.name: t.pipe.stats() for t in self.transformers if t.pipe is not None}
        if stages:
            s["pipeline"] = stages
        return s

    def model_parts(self) -> dict:
        parts = {"parallel configuration": self.config.fingerprint()}
        for rt in self.transformers:
            t = rt.model
            sample = rt.weights_sample if rt.weights_sample is not None else _weights_sample(t)
            parts.update({f"{rt.name} class": type(t).__name__,
                          f"{rt.name} config": _short(sorted((k, v) for k, v in dict(t.config).items()
                                                             if not k.startswith("_"))),
                          f"{rt.name} weights": _short(sample), f"{rt.name} attention layers": rt.attention_layers})
        return parts

    def fingerprint_parts(self, call_args: dict) -> dict:
        """What every rank must agree on, by name: configuration, model, weights sample, call arguments."""
        parts = self.model_parts()
        if self.request_rows:
            parts["request batches"] = repr(self.request_rows)
        for k, v in sorted(call_args.items()):
            if isinstance(v, (int, float, str, bool, type(None))) or (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str)) for x in v)):
                parts[k] = _short(v)
            elif isinstance(v, torch.Generator) or (isinstance(v, (list, tuple)) and v
                                                     and all(isinstance(g, torch.Generator) for g in v)):
                # the full state: an advanced generator differs from a fresh one with the same seed
                parts[k] = f"generator state {generator_fingerprint(v)}"
            elif isinstance(v, torch.Tensor):  # latents, prompt embeddings: their values, not just the shape
                parts[k] = f"tensor {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')} {tensor_digest(v)}"
        return parts

    def agreed_generator(self):
        """A CPU generator seeded identically on every rank (rank 0 draws the seed), for ``generator=None``."""
        seed = self.ctx.world_comm.broadcast_object(int(torch.randint(0, 2**62, ()).item()) if self.ctx.rank == 0
                                                    else None, src=0)
        return torch.Generator().manual_seed(int(seed))

    def check_output(self, result) -> None:
        """Collective, after every generation: the output must be finite and identical on every rank.

        Every rank learns every rank's verdict first, so all raise together (a NaN seen by one rank alone
        cannot leave the others waiting, and no rank returns an image the others refused).
        """
        out = _output_of(result)
        if out is None:
            return
        try:
            check_finite(out, f"rank {self.ctx.rank}")
            bad = 0
        except ValueError as e:
            bad = getattr(e, "count", 1) or 1
        table = self.ctx.world_comm.all_gather_object((tensor_digest(out), bad))
        ranks = [r for r, (_, b) in enumerate(table) if b]
        if ranks:
            check_finite(out, f"the generated output (non-finite on rank(s) {ranks}; NaN/Inf entered an attention "
                              f"input or output: see cf.context(pipe).coder.encoder.nonfinite_events())")
            raise RuntimeError(f"rank(s) {ranks} produced non-finite output")  # this rank's own copy was finite
        check_ranks_agree(lambda _: [d for d, _ in table], table[self.ctx.rank][0], "the generated output")

    def fingerprint(self, call_args: dict) -> str:
        """Digest of :meth:`fingerprint_parts` (exchanged by ``check_agreement`` at each call)."""
        return _digest(self.fingerprint_parts(call_args))

    def _explain_mismatch(self, err: Exception, parts: dict) -> Exception:
        """Second exchange after a mismatch: name the fields that differ and each rank's value."""
        try:
            tables = self.ctx.world_comm.all_gather_object(parts)
        except Exception:  # noqa: BLE001 - keep the original error if the explanation cannot be fetched
            return err
        names = sorted({n for t in tables for n in t}, key=lambda n: (n not in parts, n))
        diffs = [n for n in names if len({repr(t.get(n)) for t in tables}) > 1]
        if not diffs:
            return err
        what = "; ".join(f"{n} (" + ", ".join(f"rank {r}: {t.get(n)}" for r, t in enumerate(tables)) + ")"
                         for n in diffs)
        return ConfigMismatchError(f"ranks disagree on {what}; every rank must load the same model and call the pipeline "
                                   f"with the same arguments", getattr(err, "ranks", None))


def _weights_sample(model) -> list:
    """A cheap digest input of a model's weights (first values of its first tensors) for the agreement."""
    return [round(float(p.detach().reshape(-1)[:16].float().sum()), 4) for p in list(model.parameters())[:64]]


def _output_of(result):
    """The array a pipeline returned (images, frames or latents), or None when it returned nothing to check."""
    for name in ("images", "frames", "audios"):
        x = getattr(result, name, None)
        if x is not None:
            result = x
            break
    if isinstance(result, tuple) and result:
        result = result[0]
    if isinstance(result, list) and result and hasattr(result[0], "mode"):  # PIL images
        import numpy as np
        return np.stack([np.asarray(im) for im in result])
    if isinstance(result, list) and result and isinstance(result[0], list) and result[0] and hasattr(result[0][0], "mode"):
        import numpy as np  # video as lists of PIL frames
        return np.stack([np.stack([np.asarray(im) for im in v]) for v in result])
    if hasattr(result, "shape"):
        return result
    if isinstance(result, list) and result and all(hasattr(x, "shape") for x in result):
        import numpy as np
        return np.stack([np.asarray(x) for x in result])
    return None


#: Kept for callers of the earlier name.
PipelineRuntime = ModelRuntime


def install_pipeline_class(pipe, runtime: ModelRuntime) -> None:
    """Give this one pipeline instance a subclass whose __call__ brackets each generation (resets state)."""
    base = type(pipe)
    signature = inspect.signature(base.__call__)

    def __call__(self, *args, **kwargs):
        rt = self._compactfusion
        try:
            bound = signature.bind(self, *args, **kwargs)
            call_args = {k: v for k, v in bound.arguments.items() if k != "self"}
        except TypeError:
            call_args = dict(kwargs)
        for k, v in call_args.items():  # NaN guidance would silently disable guidance, inf poison the image
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number, got {v!r}")
        if "generator" in signature.parameters and call_args.get("generator") is None \
                and call_args.get("latents") is None:
            # diffusers would draw from each rank's global RNG: different noise per rank
            gen = call_args["generator"] = rt.agreed_generator()
            pos = list(signature.parameters).index("generator") - 1  # without self
            if pos < len(args):
                args = args[:pos] + (gen,) + args[pos + 1:]
            else:
                kwargs["generator"] = gen
        rt.begin_generation(call_args)
        result = base.__call__(self, *args, **kwargs)
        rt.check_output(result)
        rt.end_generation()
        return result

    cls = types.new_class(f"Parallel{base.__name__}", (base,), {}, lambda ns: ns.update({"__call__": __call__}))
    cls.__module__ = base.__module__
    pipe.__class__ = cls
    pipe._compactfusion = runtime
    pipe._compactfusion_base_class = base
