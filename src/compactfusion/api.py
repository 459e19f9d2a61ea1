"""``parallelize(pipe, config)``: two lines turn a stock diffusers pipeline into a parallel one.

    dist.init_process_group()     # torchrun
    cf.parallelize(pipe, cf.ParallelConfig(strategy="ring", compression=cf.CompressionConfig(codec="binary")))
    image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]
    cf.stats(pipe)                # bytes on the wire, compression ratio, modelled link time of the last call
"""
from __future__ import annotations

import torch.distributed as dist

from .integrations.diffusers.plans import adapter_for
from .integrations.diffusers.runtime import PipelineRuntime, install_pipeline_class
from .parallel import ParallelConfig, ParallelContext


def parallelize(pipe, config: ParallelConfig, group=None):
    """Parallelize ``pipe.transformer`` in place over the default process group (or ``group``). Returns ``pipe``.

    Every rank must call this with the same configuration and the same model, and then call the pipeline
    with the same arguments (prompt, seed, size, steps); ranks check that they agree at each call.
    """
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"config must be a compactfusion.ParallelConfig, got {type(config).__name__}")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no `transformer` component; compactfusion parallelizes "
                         f"diffusion-transformer pipelines (Flux, SD3, PixArt, ...), not UNet pipelines")
    if getattr(pipe, "_compactfusion", None) is not None:
        raise ValueError("this pipeline is already parallelized; call compactfusion.unparallelize(pipe) first")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call torch.distributed.init_process_group() first "
                         "(launch with torchrun, or `compactfusion generate --nproc N`)")
    adapter = adapter_for(transformer)
    config.resolve(dist.get_world_size())  # degrees vs world size: a ValueError before any group is built
    _check_config_agreement(config)
    ctx = ParallelContext(config, group=group)
    runtime = PipelineRuntime(pipe, transformer, adapter, ctx, config)
    install_pipeline_class(pipe, runtime)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=ctx.rank != 0)
    return pipe


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


def unparallelize(pipe):
    """Undo ``parallelize``: remove every hook and restore the pipeline's class."""
    rt = getattr(pipe, "_compactfusion", None)
    if rt is None:
        raise ValueError("this pipeline was not parallelized by compactfusion")
    rt.remove()
    pipe.__class__ = pipe._compactfusion_base_class
    del pipe._compactfusion, pipe._compactfusion_base_class
    return pipe


def stats(pipe) -> dict:
    """Ledger summary of the last pipeline call: bytes sent/uncompressed, ratio, modelled link time, state memory."""
    rt = getattr(pipe, "_compactfusion", None)
    if rt is None:
        raise ValueError("this pipeline was not parallelized by compactfusion; call compactfusion.parallelize first")
    if rt.last_stats is None:
        raise ValueError("no generation has run yet on this parallelized pipeline")
    return dict(rt.last_stats)


def context(pipe) -> ParallelContext:
    """The ParallelContext owned by a parallelized pipeline (ledger, residual states, groups)."""
    rt = getattr(pipe, "_compactfusion", None)
    if rt is None:
        raise ValueError("this pipeline was not parallelized by compactfusion")
    return rt.ctx
