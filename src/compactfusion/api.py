"""``parallelize(obj, config)``: two lines turn a stock diffusers pipeline (or a bare transformer) into a parallel one.

    dist.init_process_group()     # torchrun
    cf.parallelize(pipe, cf.ParallelConfig(strategy="ring", compression=cf.CompressionConfig(codec="binary")))
    image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]
    cf.stats(pipe)                # bytes on the wire, compression ratio, modelled link time of the last call

A bare transformer (custom sampling loops, ComfyUI-style hosts) works the same way; call
``cf.reset(transformer)`` before each new generation (a timestep that rises again also starts one).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .integrations.diffusers.plans import plan_for, unwrap_model
from .integrations.diffusers.runtime import ModelRuntime, install_pipeline_class, is_attention
from .parallel import ParallelConfig, ParallelContext

__all__ = ["parallelize", "unparallelize", "stats", "reset", "context", "set_request_batches"]


def _transformers(obj) -> list[tuple[str, torch.nn.Module]]:
    """The transformers to parallelize: ``obj`` itself, or a pipeline's ``transformer``/``transformer_2``/..."""
    if isinstance(obj, torch.nn.Module):
        return [("transformer", obj)]
    comps = getattr(obj, "components", None)
    if not isinstance(comps, dict) and isinstance(getattr(obj, "transformer", None), torch.nn.Module):
        comps = {"transformer": obj.transformer}  # a pipeline-like object without diffusers' registry
    if not isinstance(comps, dict):
        raise TypeError(f"parallelize takes a diffusers pipeline or a diffusers transformer, got {type(obj).__name__}")
    found = [(n, m) for n, m in comps.items() if n.startswith("transformer") and isinstance(m, torch.nn.Module)]
    if not found:
        raise ValueError(f"{type(obj).__name__} has no transformer component; compactfusion parallelizes "
                         f"diffusion-transformer pipelines (Flux, SD3, Wan, ...), not UNet pipelines")
    return found


def _check_compile(name: str, module) -> None:
    """Whole-model torch.compile must wrap the parallelized model, not be wrapped by it."""
    if getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod"):
        raise ValueError(f"{name} is already compiled with torch.compile; compactfusion must see the eager model: call "
                         f"compactfusion.parallelize first, then compile the repeated blocks "
                         f"({name}.compile_repeated_blocks()) — whole-model compilation is not supported")


def parallelize(obj, config: ParallelConfig, group=None, plan=None):
    """Parallelize a pipeline's transformer(s), or a bare transformer, in place over the default group. Returns ``obj``.

    Every rank must call this with the same configuration and the same model, and then run the model with
    the same arguments (prompt, seed, size, steps); ranks check that they agree at each generation.
    ``plan`` (or ``config.plan``) overrides the built-in sharding plan of the model's family.
    """
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"config must be a compactfusion.ParallelConfig, got {type(config).__name__}")
    if getattr(obj, "_compactfusion", None) is not None:
        raise ValueError("this model is already parallelized; call compactfusion.unparallelize(...) first")
    transformers = _transformers(obj)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call torch.distributed.init_process_group() first "
                         "(launch with torchrun, or `compactfusion generate --nproc N`)")
    user_plan = plan if plan is not None else config.plan
    if user_plan is not None and len(transformers) > 1:
        raise ValueError("a user plan applies to one transformer; this pipeline has "
                         f"{', '.join(n for n, _ in transformers)}: parallelize the transformer itself")
    for name, t in transformers:
        _check_compile(name, t)
    plans = [plan_for(t, user_plan) for _, t in transformers]
    config.resolve(dist.get_world_size())  # degrees vs world size: a ValueError before any group is built
    _check_config_agreement(config)
    ctx = ParallelContext(config, group=group)
    bare = isinstance(obj, torch.nn.Module)
    try:
        runtime = ModelRuntime(obj, transformers, plans, ctx, config, bare=bare)
    except Exception:
        ctx.close()
        raise
    if bare:
        obj._compactfusion = runtime
    else:
        install_pipeline_class(obj, runtime)
        if hasattr(obj, "set_progress_bar_config"):
            obj.set_progress_bar_config(disable=ctx.rank != 0)
    return obj


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_config_agreement(config: ParallelConfig) -> None:
    """Collective: all ranks must pass the same configuration; otherwise raise on every rank, naming the fields.

    Runs before the context builds its process groups, so a mismatch (e.g. different strategies, which
    build different groups) ends in this message instead of a hang or mixed-up collectives.
    """
    from .comm import Communicator
    from .parallel.errors import ConfigMismatchError

    comm = Communicator(None, None, None, config.timeout_s)
    flat = _flat(config.to_dict())
    flat.pop("timeout_s", None)  # a per-rank timeout may legitimately differ
    tables = comm.all_gather_object((config.fingerprint(), flat))
    bad = [r for r, t in enumerate(tables) if t[0] != tables[0][0]]
    if not bad:
        return
    names = [n for n in flat if len({repr(t[1].get(n)) for t in tables}) > 1] or ["compression.plan"]
    what = "; ".join(f"{n} (" + ", ".join(f"rank {r}: {t[1].get(n)!r}" for r, t in enumerate(tables)) + ")"
                     for n in names)
    raise ConfigMismatchError(f"ranks {bad} were given a different ParallelConfig than rank 0: {what}; pass the "
                              f"same configuration on every rank", bad)


def _runtime(obj) -> ModelRuntime:
    rt = getattr(obj, "_compactfusion", None)
    if rt is None:
        raise ValueError(f"this {type(obj).__name__} was not parallelized by compactfusion; call "
                         f"compactfusion.parallelize first")
    return rt


def unparallelize(obj):
    """Undo ``parallelize``: remove every hook, restore the pipeline's class, release the process groups."""
    rt = _runtime(obj)
    rt.remove()
    rt.ctx.close()
    if rt.bare:
        del obj._compactfusion
    else:
        obj.__class__ = obj._compactfusion_base_class
        del obj._compactfusion, obj._compactfusion_base_class
    return obj


def reset(obj) -> None:
    """Start a new generation on a parallelized transformer or pipeline (pipelines do this at every call)."""
    _runtime(obj).reset()


def set_request_batches(obj, sizes) -> None:
    """Give each request of a batched call its own residual streams: ``sizes`` = images per request, in order.

    For a pipeline called with the prompts of several requests at once (a serving batch); ``None`` ends
    it. Every rank must pass the same sizes (checked with the call arguments).
    """
    rt = _runtime(obj)
    if sizes is not None:
        sizes = list(sizes)
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"sizes must be a non-empty list of positive image counts per request, got {sizes!r}")
    rt.request_rows = sizes


def stats(obj) -> dict:
    """Ledger summary of the last generation: bytes sent/uncompressed, ratio, modelled link time, state memory.

    For a bare transformer: since the last reset (the generation in progress or just finished).
    """
    rt = _runtime(obj)
    if rt.bare:
        if rt.step < 0:
            raise ValueError("no transformer call has run yet on this parallelized transformer")
        return rt.summary()
    if rt.last_stats is None:
        raise ValueError("no generation has run yet on this parallelized pipeline")
    return dict(rt.last_stats)


def context(obj) -> ParallelContext:
    """The ParallelContext owned by a parallelized pipeline or transformer (ledger, residual states, groups)."""
    return _runtime(obj).ctx
