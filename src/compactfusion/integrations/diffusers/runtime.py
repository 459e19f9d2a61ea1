"""Per-pipeline runtime: owns the parallel context and the hooks that shard, gather and count steps.

Everything one generation needs lives here (no module-level state): the denoising-step counter (one
transformer call = one step), the token counts of the current call, and the ``ParallelContext`` whose
residual states are reset at the start of every pipeline call.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import types

import torch

from ...parallel.errors import ConfigMismatchError
from .plans import ModelAdapter
from .router import AttentionRouter

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


def _is_attention(module) -> bool:
    return hasattr(module, "processor") and hasattr(module, "set_processor")


class PipelineRuntime:
    def __init__(self, pipe, transformer, adapter: ModelAdapter, ctx, config):
        self.pipe, self.transformer, self.adapter, self.ctx, self.config = pipe, transformer, adapter, ctx, config
        self.step = -1
        self.local_tokens: int | None = None
        self.joint_tokens = 0
        self.total_tokens = 0
        self.last_stats: dict | None = None
        self.calls = 0
        self._undo: list = []
        self._signature = inspect.signature(transformer.forward)
        self.num_attention_layers = 0
        self._hook = _test_hook(getattr(ctx, "rank", 0))
        self._install()

    # -- installation --------------------------------------------------------------------------
    def _install(self) -> None:
        t, a = self.transformer, self.adapter
        for name in (a.token_embed, a.output) + ((a.rotary,) if a.rotary else ()):
            if not hasattr(t, name):
                raise ValueError(f"{type(t).__name__} has no `{name}` module that the {a.name} adapter needs")
        self._undo.append(getattr(t, a.token_embed).register_forward_hook(self._shard_tokens).remove)
        self._undo.append(getattr(t, a.output).register_forward_hook(self._gather_tokens).remove)
        if a.rotary:
            self._undo.append(getattr(t, a.rotary).register_forward_hook(self._shard_rotary).remove)
        layer = 0
        for module in t.modules():
            if _is_attention(module):
                self._wrap_forward(module, self._attention_forward(module.forward, layer))
                layer += 1
        if layer == 0:
            raise ValueError(f"{type(t).__name__} has no diffusers attention modules to parallelize")
        self.num_attention_layers = layer
        self._wrap_forward(t, self._transformer_forward(t.forward))

    def _wrap_forward(self, module, new_forward) -> None:
        had = "forward" in module.__dict__
        old = module.__dict__.get("forward")
        module.forward = new_forward

        def undo():
            if had:
                module.forward = old
            else:
                del module.forward
        self._undo.append(undo)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    # -- hooks ---------------------------------------------------------------------------------
    def _attention_forward(self, original, layer: int):
        runtime = self

        def forward(*args, **kwargs):
            if runtime.local_tokens is None:  # called outside a sharded transformer call
                return original(*args, **kwargs)
            with AttentionRouter(runtime, layer):
                return original(*args, **kwargs)
        return forward

    def _shard_tokens(self, module, args, output):
        if not isinstance(output, torch.Tensor) or output.ndim != 3:
            raise ValueError(f"{self.adapter.name} adapter: `{self.adapter.token_embed}` returned "
                             f"{type(output).__name__}, expected a (batch, tokens, channels) tensor")
        self.total_tokens = output.shape[1]
        if self.total_tokens < self.ctx.seq_world:
            raise ValueError(f"{self.total_tokens} image tokens cannot be split over {self.ctx.seq_world} "
                             f"sequence-parallel ranks; use a larger image or fewer ranks")
        local = self.ctx.shard_seq(output, 1)
        self.local_tokens = local.shape[1]
        return local

    def _shard_rotary(self, module, args, output):
        t = self.joint_tokens

        def cut(x):
            return torch.cat([x[:t], self.ctx.shard_seq(x[t:], 0)], dim=0)
        return tuple(cut(x) for x in output) if isinstance(output, (tuple, list)) else cut(output)

    def _gather_tokens(self, module, args, output):
        return self.ctx.gather_seq(output, 1, step=self.step)

    def _transformer_forward(self, original):
        runtime = self

        def forward(*args, **kwargs):
            bound = runtime._signature.bind(*args, **kwargs)
            runtime.step += 1
            if runtime._hook is not None:
                runtime._hook(runtime.step)
            runtime.joint_tokens = runtime.adapter.joint_tokens(bound.arguments)
            if runtime.ctx.cfg_world > 1:
                runtime._split_cfg(bound.arguments)
            try:
                out = original(*bound.args, **bound.kwargs)
            finally:
                runtime.local_tokens = None
            if runtime.ctx.cfg_world > 1:
                out = runtime._gather_cfg(out)
            return out
        return forward

    # -- CFG parallel --------------------------------------------------------------------------
    def _split_cfg(self, arguments: dict) -> None:
        hs = arguments.get("hidden_states")
        batch = hs.shape[0]
        if batch % 2:
            raise ValueError(f"cfg_parallel needs the pipeline to batch the conditional and unconditional inputs, "
                             f"but the transformer got batch {batch}; enable guidance (guidance_scale > 1) or "
                             f"turn cfg_parallel off")
        half, r = batch // 2, self.ctx.cfg_rank

        def split(v):
            if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch:
                return v[r * half:(r + 1) * half]
            if isinstance(v, dict):
                return {k: split(x) for k, x in v.items()}
            return v
        names = self.adapter.batch_args or [n for n in arguments if not n.endswith("_ids")]
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

    # -- generations ---------------------------------------------------------------------------
    def begin_generation(self, call_args: dict) -> None:
        self.ctx.reset()
        self.step = -1
        self.local_tokens = None
        parts = self.fingerprint_parts(call_args)
        try:
            self.ctx.check_agreement(_digest(parts))
        except ConfigMismatchError as e:  # every rank got the same verdict, so all are here
            raise self._explain_mismatch(e, parts) from None

    def end_generation(self) -> None:
        self.calls += 1
        s = self.ctx.summary()
        # Flat keys for cf.stats(): the ledger totals, and the residual state still held after the call
        # (bases of every stream, sender and receiver sides; freed at the start of the next call).
        for k, v in (s.get("ledger") or {}).items():
            s.setdefault(k, v)
        s.setdefault("state_bytes", int(self.ctx.state_nbytes()))
        s.update(steps=self.step + 1, attention_layers=self.num_attention_layers, generation=self.calls)
        self.last_stats = s

    def fingerprint_parts(self, call_args: dict) -> dict:
        """What every rank must agree on, by name: configuration, model, weights sample, call arguments."""
        t = self.transformer
        sample = [round(float(p.detach().reshape(-1)[:16].float().sum()), 4) for p in list(t.parameters())[:64]]
        parts = {"parallel configuration": self.config.fingerprint(), "model class": type(t).__name__,
                 "model config": _short(sorted((k, v) for k, v in dict(t.config).items() if not k.startswith("_"))),
                 "model weights": _short(sample), "attention layers": self.num_attention_layers}
        for k, v in sorted(call_args.items()):
            if isinstance(v, (int, float, str, bool, type(None))) or (isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str)) for x in v)):
                parts[k] = _short(v)
            elif isinstance(v, torch.Generator):
                parts[k] = f"seed {v.initial_seed()}"
            elif isinstance(v, torch.Tensor):
                parts[k] = f"tensor {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
        return parts

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


def _digest(parts: dict) -> str:
    return hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:16]


def install_pipeline_class(pipe, runtime: PipelineRuntime) -> None:
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
        rt.begin_generation(call_args)
        result = base.__call__(self, *args, **kwargs)
        rt.end_generation()
        return result

    cls = types.new_class(f"Parallel{base.__name__}", (base,), {}, lambda ns: ns.update({"__call__": __call__}))
    cls.__module__ = base.__module__
    pipe.__class__ = cls
    pipe._compactfusion = runtime
    pipe._compactfusion_base_class = base
