"""``compactfusion generate``: one (parallel) generation, with bytes, time and fidelity in ``report.json``.

Runs in three ways: ``--nproc N`` self-launches N local workers with torch's elastic launcher (gloo on
CPU, NCCL on CUDA); under ``torchrun`` it uses the launcher's environment; otherwise it runs on one
process. Multi-node: ``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint`` pass through to the launcher.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .args import Parser, UsageError

STRATEGIES = ("none", "patch", "distrifusion", "ring", "ulysses", "usp")
MAX_LOCAL_PROCS = 64


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compactfusion generate", description=__doc__.splitlines()[0])
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="default: the bundled digits model; or a local diffusers folder / "
                   "hub id already in the local cache (resolved offline)")
    m.add_argument("--prompt", default="7", help="prompt (for the bundled model: a digit 0-9)")
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--height", type=int, default=None)
    m.add_argument("--width", type=int, default=None)
    m.add_argument("--guidance-scale", type=float, default=None)
    m.add_argument("--num-images", type=int, default=1, help="images per prompt")
    m.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: fp32 on CPU, bf16 on CUDA")
    par = p.add_argument_group("parallelism")
    par.add_argument("--nproc", type=int, default=None, help="self-launch N local workers (default 1)")
    par.add_argument("--strategy", choices=STRATEGIES, default=None, help="default: ring when world > 1, else none")
    par.add_argument("--ulysses-degree", type=int, default=None)
    par.add_argument("--ring-degree", type=int, default=None)
    par.add_argument("--cfg-parallel", action="store_true")
    par.add_argument("--timeout", type=float, default=60.0, help="seconds before a collective is declared dead")
    par.add_argument("--check-consistency", type=int, default=0, metavar="K",
                     help="compare every stream's state across ranks every K steps")
    comp = p.add_argument_group("compression")
    comp.add_argument("--codec", default="none", help="none, binary, int2, int4, int8, lowrank:R, lowrank-int4:R, topk:M, fp16, bf16")
    comp.add_argument("--warmup-steps", type=int, default=1)
    comp.add_argument("--residual", type=int, choices=(0, 1, 2), default=1)
    comp.add_argument("--no-error-feedback", action="store_true")
    comp.add_argument("--delta-decay", type=float, default=0.5)
    link = p.add_argument_group("link model")
    link.add_argument("--bandwidth", default="inf", help='e.g. "500MB/s", "10Gbit/s", "inf"')
    link.add_argument("--latency", default="0", help='e.g. "50us", "1ms"')
    link.add_argument("--link-mode", choices=("off", "sleep", "virtual"), default="virtual")
    out = p.add_argument_group("output")
    out.add_argument("--reference", action="store_true", help="also run the single-device pipeline and report fidelity")
    out.add_argument("--out", default="out", help="output folder")
    out.add_argument("--quiet", action="store_true")
    mn = p.add_argument_group("multi-node (passed to the elastic launcher)")
    mn.add_argument("--nnodes", type=int, default=1)
    mn.add_argument("--node-rank", type=int, default=None, help="with --rdzv-backend static")
    mn.add_argument("--rdzv-endpoint", default=None, help="host:port of the rendezvous (c10d)")
    mn.add_argument("--rdzv-backend", choices=("c10d", "static"), default="c10d")
    mn.add_argument("--rdzv-id", default=None, help="job id shared by all nodes (default: derived from the endpoint)")
    return p


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def build_configs(a, world: int):
    """Validate arguments and build (ParallelConfig, CompressionConfig, LinkModel). Raises ValueError/UsageError."""
    from ..comm import LinkModel
    from ..parallel import ParallelConfig
    from ..residual import CompressionConfig

    for name in ("steps", "num_images"):
        if getattr(a, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    for name in ("height", "width"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name} must be positive, got {v}")
    if a.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {a.warmup_steps}")
    if a.codec != "none" and a.warmup_steps >= a.steps:
        raise UsageError(f"--warmup-steps ({a.warmup_steps}) must be smaller than --steps ({a.steps}), "
                         f"or nothing is ever compressed")
    if a.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {a.timeout}")
    if a.check_consistency < 0:
        raise UsageError(f"--check-consistency must be >= 0, got {a.check_consistency}")
    strategy = a.strategy or ("ring" if world > 1 else "none")
    if strategy == "none" and world > 1 and not a.cfg_parallel:
        raise UsageError(f"--strategy none runs on one process, but the world has {world}; pick a parallel strategy")
    if strategy != "usp" and (a.ulysses_degree or a.ring_degree) and not (strategy == "ulysses" and a.ring_degree in (None, 1)) \
            and not (strategy == "ring" and a.ulysses_degree in (None, 1)):
        raise UsageError("--ulysses-degree/--ring-degree combine only with --strategy usp (or the matching single strategy)")
    if a.codec == "none" and (a.no_error_feedback or a.residual != 1):
        raise UsageError("--residual/--no-error-feedback only make sense with a --codec; add e.g. --codec binary")
    link = LinkModel(bandwidth=a.bandwidth, latency=a.latency, mode=a.link_mode)
    error_feedback = not a.no_error_feedback and a.residual != 0
    compression = CompressionConfig(codec=a.codec, residual_order=a.residual, error_feedback=error_feedback,
                                    warmup_steps=a.warmup_steps, delta_decay=a.delta_decay)
    cfg = ParallelConfig(strategy=strategy, compression=compression, link=link, ulysses_degree=a.ulysses_degree,
                         ring_degree=a.ring_degree, cfg_parallel=a.cfg_parallel, timeout_s=a.timeout,
                         check_consistency_every=a.check_consistency)
    cfg.validate_world(world)
    return cfg, compression, link


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.nproc is not None and not 1 <= a.nproc <= MAX_LOCAL_PROCS:
        raise UsageError(f"--nproc must be between 1 and {MAX_LOCAL_PROCS}, got {a.nproc}")
    if a.nnodes < 1:
        raise UsageError(f"--nnodes must be >= 1, got {a.nnodes}")
    if a.nnodes > 1 and not a.rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if a.model is not None and not (Path(a.model).is_dir() or "/" in a.model):
        raise UsageError(f"--model {a.model!r} is neither a local folder nor a hub id (owner/name)")
    if a.model is not None and a.model.startswith((".", "/")) and not Path(a.model).is_dir():
        raise UsageError(f"--model folder {a.model!r} does not exist")
    if under_launcher():
        world = int(os.environ["WORLD_SIZE"])
        if a.nproc not in (None, 1):
            raise UsageError("--nproc self-launches workers; under torchrun leave it out (torchrun sets the world)")
        build_configs(a, world)
        return worker(vars(a), None)
    nproc = a.nproc or 1
    build_configs(a, nproc * a.nnodes)  # fail fast, before any process starts
    if nproc * a.nnodes == 1:
        return worker(vars(a), None)
    return launch(a, nproc)


def launch(a, nproc: int) -> int:
    """Start nproc local workers (and join other nodes) through torch's elastic launcher."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    errdir = tempfile.mkdtemp(prefix="compactfusion-err-")
    endpoint = a.rdzv_endpoint or f"127.0.0.1:{_free_port()}"
    rdzv_configs = {"rank": a.node_rank} if a.rdzv_backend == "static" and a.node_rank is not None else {}
    config = LaunchConfig(min_nodes=a.nnodes, max_nodes=a.nnodes, nproc_per_node=nproc, run_id=a.rdzv_id or
                          ("compactfusion-" + (endpoint if a.rdzv_endpoint else uuid.uuid4().hex[:8])).replace(":", "-"),
                          rdzv_backend=a.rdzv_backend, rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs,
                          max_restarts=0, monitor_interval=0.1, start_method="spawn")
    if a.rdzv_backend == "static":
        config.rdzv_configs.setdefault("rank", a.node_rank or 0)
    try:
        elastic_launch(config, worker)(vars(a), errdir)
    except ChildFailedError as e:
        return _report_failure(e, errdir)
    return 0


def _report_failure(e, errdir: str) -> int:
    user_errors = sorted(Path(errdir).glob("rank*.txt"))
    if user_errors:
        print(f"compactfusion: error: {user_errors[0].read_text().strip()}", file=sys.stderr)
        return 2
    rank, failure = next(iter(sorted(e.failures.items())))
    reason = failure.message if isinstance(failure.message, str) and failure.message else ""
    if not reason and failure.exitcode is not None and failure.exitcode < 0:
        import signal
        reason = f"killed by signal {signal.Signals(-failure.exitcode).name}"
    reason = reason or f"exit code {failure.exitcode}"
    print(f"compactfusion: error: rank {rank} failed: {reason.splitlines()[0]}", file=sys.stderr)
    return 1


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: dict, errdir: str | None) -> int:
    """One rank. User errors are written to errdir (for the launcher) and printed as one line; exit code 2."""
    from .worker import run_worker
    try:
        return run_worker(argparse.Namespace(**args))
    except (UsageError, ValueError, TypeError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        rank = os.environ.get("RANK", "0")
        if errdir:
            Path(errdir, f"rank{int(rank):04d}.txt").write_text(f"rank {rank}: {msg}")
            sys.exit(2)
        raise
