"""Flags and configuration shared by the commands that run a parallel model (``generate``, ``serve``).

``add_common_args(parser)`` adds the model, parallelism, compression and link flags;
``add_launch_args(parser)`` the local/multi-node launcher flags; ``build_configs(args, world)`` turns them
into ``(ParallelConfig, CompressionConfig, LinkModel)``. Both ``generate`` and its workers import this
module (it imports neither), so the two stay free of an import circle.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..parallel.registry import STRATEGIES  # the one list of strategy names
from .args import UsageError

#: ``--dtype`` names -> torch dtype attribute names (resolved lazily: importing torch costs a second).
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MAX_LOCAL_PROCS = 64
MAX_NODES = 1024
#: ``--timeout`` bounds: below 0.1 s no collective completes reliably; above a day is a typo (and 1e20 overflows).
TIMEOUT_RANGE_S = (0.1, 86400.0)
#: ``--rdzv-timeout`` bounds and default (the elastic launcher's own default waits 600 s in silence).
RDZV_TIMEOUT_RANGE_S = (1.0, 3600.0)
DEFAULT_RDZV_TIMEOUT_S = 60.0
BUNDLED_MARKER = Path(__file__).resolve().parent.parent / "bundled" / "assets" / "digits" / "digits_pipeline.json"


def torch_dtype(name: str, cuda: bool):
    """``--dtype`` to a torch dtype; ``auto`` is fp32 on CPU, bf16 on CUDA."""
    import torch
    return getattr(torch, DTYPES.get(name) or ("bfloat16" if cuda else "float32"))


def add_common_args(p) -> None:
    """Model, parallelism, compression and link-model flags (the same for every command that runs a model)."""
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="default: the bundled digits model; or a local diffusers folder / "
                   "hub id already in the local cache (resolved offline)")
    m.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: fp32 on CPU, bf16 on CUDA")
    par = p.add_argument_group("parallelism")
    par.add_argument("--strategy", choices=STRATEGIES, default=None, help="default: ring when world > 1, else none")
    par.add_argument("--ulysses-degree", type=int, default=None)
    par.add_argument("--ring-degree", type=int, default=None)
    par.add_argument("--cfg-parallel", action="store_true")
    par.add_argument("--num-patches", type=int, default=None, metavar="M",
                     help="pipefusion: image patches per step (>= the number of stages; default one per stage)")
    par.add_argument("--pipefusion-text", choices=("first", "every"), default=None,
                     help="pipefusion, joint-text families (FLUX, SD3): run the text in the first patch pass of each "
                          "step (default; M times less text work) or in every pass")
    par.add_argument("--timeout", type=float, default=60.0,
                     help=f"seconds before a collective is declared dead ({TIMEOUT_RANGE_S[0]:g}..{TIMEOUT_RANGE_S[1]:g})")
    par.add_argument("--check-consistency", type=int, default=0, metavar="K",
                     help="compare every stream's state across ranks every K steps")
    comp = p.add_argument_group("compression")
    comp.add_argument("--codec", default="none",
                      help="none, auto, binary, int2, int4, int8, lowrank:R, lowrank-int4:R, lowrank-int4-bpe:BITS, topk:M, fp16, bf16")
    comp.add_argument("--warmup-steps", type=int, default=1)
    comp.add_argument("--residual", type=int, choices=(0, 1, 2), default=1)
    comp.add_argument("--no-error-feedback", action="store_true")
    comp.add_argument("--delta-decay", type=float, default=0.5)
    comp.add_argument("--auto-delta-decay", action="store_true",
                      help="order 2: each stream estimates its decay from its own reconstructed deltas (no extra bytes)")
    comp.add_argument("--warmup-codec", default=None,
                      help="code the warmup steps with this codec (e.g. int8, int4) and error feedback from step 0; "
                           "default: full precision")
    link = p.add_argument_group("link model")
    link.add_argument("--bandwidth", default="inf", help='e.g. "500MB/s", "10Gbit/s", "inf"')
    link.add_argument("--latency", default="0", help='e.g. "50us", "1ms"')
    link.add_argument("--link-mode", choices=("off", "sleep", "virtual"), default="virtual")


def add_launch_args(p) -> None:
    """``--nproc`` and the multi-node flags passed to torch's elastic launcher."""
    p.add_argument("--nproc", type=int, default=None, help="self-launch N local workers (default 1)")
    mn = p.add_argument_group("multi-node (passed to the elastic launcher)")
    mn.add_argument("--nnodes", type=int, default=1)
    mn.add_argument("--node-rank", type=int, default=None, help="with --rdzv-backend static")
    mn.add_argument("--rdzv-endpoint", default=None, help="host:port of the rendezvous (c10d)")
    mn.add_argument("--rdzv-backend", choices=("c10d", "static"), default="c10d")
    mn.add_argument("--rdzv-id", default=None, help="job id shared by all nodes (default: derived from the endpoint)")
    mn.add_argument("--rdzv-timeout", type=float, default=DEFAULT_RDZV_TIMEOUT_S,
                    help=f"seconds to wait for every node to join (default {DEFAULT_RDZV_TIMEOUT_S:g})")


def check_finite_flags(a, names) -> None:
    """Float flags must be finite (``--guidance-scale nan`` would silently turn guidance off)."""
    for name in names:
        v = getattr(a, name, None)
        if v is not None and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {v}")


def build_configs(a, world: int):
    """Validate arguments and build (ParallelConfig, CompressionConfig, LinkModel). Raises ValueError/UsageError.

    Generation flags (``steps``...) are checked when ``a`` has them (``serve`` has no ``--steps``)."""
    from ..comm import LinkModel
    from ..parallel import ParallelConfig
    from ..residual import CompressionConfig

    check_finite_flags(a, ("timeout", "delta_decay", "guidance_scale"))
    steps = getattr(a, "steps", None)
    for name in ("steps", "num_images"):
        v = getattr(a, name, None)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    for name in ("height", "width"):
        v = getattr(a, name, None)
        if v is not None and v <= 0:
            raise UsageError(f"--{name} must be positive, got {v}")
    seed = getattr(a, "seed", 0)
    if not 0 <= seed < 2**63:
        raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {seed}")
    if a.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {a.warmup_steps}")
    if steps is not None and a.codec != "none" and a.warmup_steps >= steps:
        raise UsageError(f"--warmup-steps ({a.warmup_steps}) must be smaller than --steps ({steps}), "
                         f"or nothing is ever compressed")
    lo, hi = TIMEOUT_RANGE_S
    if a.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {a.timeout}")
    if not lo <= a.timeout <= hi:
        raise UsageError(f"--timeout must be between {lo:g} and {hi:g} seconds, got {a.timeout:g}")
    if a.check_consistency < 0:
        raise UsageError(f"--check-consistency must be >= 0, got {a.check_consistency}")
    strategy = a.strategy or ("ring" if world > 1 else "none")
    if strategy == "none" and world > 1 and not a.cfg_parallel:
        raise UsageError(f"--strategy none runs on one process, but the world has {world}; pick a parallel strategy")
    if strategy != "usp" and (a.ulysses_degree or a.ring_degree) and not (strategy == "ulysses" and a.ring_degree in (None, 1)) \
            and not (strategy == "ring" and a.ulysses_degree in (None, 1)):
        raise UsageError("--ulysses-degree/--ring-degree combine only with --strategy usp (or the matching single strategy)")
    patches = getattr(a, "num_patches", None)
    if patches is not None and strategy != "pipefusion":
        raise UsageError("--num-patches applies to --strategy pipefusion only")
    if patches is not None and patches < 1:
        raise UsageError(f"--num-patches must be >= 1, got {patches}")
    text = getattr(a, "pipefusion_text", None)
    if text is not None and strategy != "pipefusion":
        raise UsageError("--pipefusion-text applies to --strategy pipefusion only")
    if a.codec == "none" and (a.no_error_feedback or a.residual != 1):
        raise UsageError("--residual/--no-error-feedback only make sense with a --codec; add e.g. --codec binary")
    link = LinkModel(bandwidth=a.bandwidth, latency=a.latency, mode=a.link_mode)
    error_feedback = not a.no_error_feedback and a.residual != 0
    coder = dict(residual_order=a.residual, error_feedback=error_feedback, warmup_steps=a.warmup_steps,
                 delta_decay="auto" if getattr(a, "auto_delta_decay", False) else a.delta_decay,
                 warmup_codec=getattr(a, "warmup_codec", None))
    if a.codec == "auto":  # per-layer choice by measured coding time and link speed
        from ..parallel.auto import auto_compression
        from ..parallel.config import AUTO_FLOOR
        compression = auto_compression(floor=AUTO_FLOOR.get(a.strategy), **coder)
    else:
        compression = CompressionConfig(codec=a.codec, **coder)
    cfg = ParallelConfig(strategy=strategy, compression=compression, link=link, ulysses_degree=a.ulysses_degree,
                         ring_degree=a.ring_degree, cfg_parallel=a.cfg_parallel, timeout_s=a.timeout,
                         check_consistency_every=a.check_consistency, num_patches=patches, pipefusion_text=text)
    cfg.resolve(world)
    return cfg, compression, link
