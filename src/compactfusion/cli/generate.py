"""``compactfusion generate``: one (parallel) generation, with bytes, time and fidelity in ``report.json``.

Runs in three ways: ``--nproc N`` self-launches N local workers with torch's elastic launcher (gloo on
CPU, NCCL on CUDA; every socket on 127.0.0.1); under ``torchrun`` it uses the launcher's environment;
otherwise it runs on one process. Multi-node: ``--nnodes``, ``--node-rank``, ``--rdzv-endpoint`` and
``--rdzv-timeout`` pass through to the launcher. Everything checkable without weights is checked first
(``cli/validate.py``), in about a second.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from .args import Parser, RunFailed, UsageError
from .config import (BUNDLED_MARKER, MAX_LOCAL_PROCS, STRATEGIES, add_common_args, add_launch_args,  # noqa: F401
                     build_configs)
from .launch import PEER_FAILURE_EXIT, PEER_FAILURE_GRACE_S, launch  # noqa: F401  (re-exported for bench/)

__all__ = ["build_parser", "build_configs", "validate", "main", "worker", "launch"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compactfusion generate", description=__doc__.splitlines()[0])
    add_common_args(p)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default="7", help="prompt (for the bundled model: a digit 0-9)")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    add_launch_args(p)
    out = p.add_argument_group("output")
    out.add_argument("--reference", action="store_true", help="also run the single-device pipeline and report fidelity")
    out.add_argument("--out", default="out", help="output folder")
    out.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    out.add_argument("--quiet", action="store_true")
    return p


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def validate(a, world: int):
    """Every check that needs no weights (cli/validate.py). Returns the ParallelConfig."""
    from .validate import check_launch, check_link, check_model_args, check_output, check_sizes, inspect_model
    check_launch(a)
    check_sizes(a)
    check_output(a)
    info = inspect_model(a.model)
    cfg, _, _ = build_configs(a, world)
    check_model_args(a, cfg, world, info)
    check_link(a, cfg, world, info)
    return cfg


def check_model_args(a, cfg, world: int) -> None:
    """Kept for callers of the old name: model checks from the files on disk."""
    from .validate import check_model_args as check, inspect_model
    check(a, cfg, world, inspect_model(a.model))


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local run never reaches the network (inherited by workers)
    a = build_parser().parse_args(argv)
    if under_launcher():
        if a.nproc not in (None, 1):
            raise UsageError("--nproc self-launches workers; under torchrun leave it out (torchrun sets the world)")
        world = int(os.environ["WORLD_SIZE"])
        validate(a, world)
        return worker(vars(a), None)
    nproc = a.nproc or 1
    validate(a, nproc * a.nnodes)  # fail fast, before any process starts
    if nproc * a.nnodes == 1:
        return worker(vars(a), None)
    return launch(a, nproc)


def quiet_libraries() -> None:
    """Silence library chatter in launched workers (deprecation warnings, "Loading pipeline components"
    bars, optional-dependency notices), so a failure ends in the launcher's one line. COMPACTFUSION_DEBUG=1
    keeps everything."""
    if os.environ.get("COMPACTFUSION_DEBUG"):
        return
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*zero-element tensors.*")
    for mod in ("diffusers", "transformers"):
        try:
            logging_mod = __import__(f"{mod}.utils.logging", fromlist=["set_verbosity_error"])
        except ImportError:
            continue
        logging_mod.set_verbosity_error()
        if hasattr(logging_mod, "disable_progress_bar"):
            logging_mod.disable_progress_bar()


def _is_peer_failure(e: BaseException) -> bool:
    """A CommError, or torch's own store/network error (a peer stalled or died during start-up)."""
    from ..comm import CommError
    if isinstance(e, CommError):
        return True
    import torch.distributed as dist
    # DistBackendError: gloo's own timeout in the start-up barrier; DistStoreError: a peer never joined the store
    kinds = tuple(getattr(dist, n) for n in ("DistStoreError", "DistNetworkError", "DistBackendError") if hasattr(dist, n))
    return isinstance(e, kinds)


def _on_signal(rank: str, errdir: str | None):
    def handler(signum, frame):
        # A worker's SIGINT (Ctrl-C reaches the whole process group): one note, no traceback, no teardown
        # that could wait on a peer.
        name = signal.Signals(signum).name
        if errdir:
            Path(errdir, f"rank{int(rank):04d}.fail").write_text(f"interrupted by {name}")
        sys.stderr.flush()
        os._exit(128 + signum)
    return handler


def worker(args: dict, errdir: str | None, body=None) -> int:
    """One rank running ``body(namespace)`` (default: ``run_worker``), with the failure protocol:

    * user errors (ValueError/TypeError/UsageError, incl. ConfigMismatchError) go to errdir and exit 2;
    * NaN output or ranks that diverged (``RunFailed``, ``NonFiniteOutputError``, ``RankDivergenceError``)
      are noted and exit 1;
    * a CommError or a torch store/network error (a peer died, stalled or closed its connection) is a
      consequence: note it, wait PEER_FAILURE_GRACE_S so the launcher reports the rank that failed first,
      exit PEER_FAILURE_EXIT;
    * anything else is noted in errdir (one line for the launcher) and re-raised (traceback on stderr).
    Without errdir (one process, or torchrun) user errors propagate to ``run_guarded``.
    """
    from ..integrations.diffusers.guards import NonFiniteOutputError, RankDivergenceError
    if body is None:
        from .worker import run_worker as body
    rank = os.environ.get("RANK", "0")
    for k, v in (args.pop("_cf_env", None) or {}).items():  # loopback interfaces for gloo/NCCL (see launch.py)
        os.environ.setdefault(k, v)
    if errdir:
        quiet_libraries()
        Path(errdir, f"rank{int(rank):04d}.pid").write_text(str(os.getpid()))
        # SIGINT only: the agent's SIGTERM (stopping the survivors of a failure) keeps its default action
        signal.signal(signal.SIGINT, _on_signal(rank, errdir))

    def note(suffix: str, text: str) -> None:
        if errdir:
            Path(errdir, f"rank{int(rank):04d}.{suffix}").write_text(text)

    def first_line(e: BaseException) -> str:
        return (str(e).splitlines()[0] if str(e) else type(e).__name__)[:250]

    try:
        return body(argparse.Namespace(**args))
    except (RunFailed, NonFiniteOutputError, RankDivergenceError) as e:
        msg = f"{type(e).__name__}: {first_line(e)}"
        note("fail", msg)
        if errdir:
            sys.exit(1)
        raise RunFailed(f"rank {rank}: {msg}") from None
    except (UsageError, ValueError, TypeError, FileNotFoundError) as e:
        if errdir:
            note("txt", f"rank {rank}: {first_line(e)}")
            sys.exit(2)
        raise
    except Exception as e:
        if not _is_peer_failure(e):
            note("fail", f"{type(e).__name__}: {first_line(e)}")
            if errdir and os.environ.get("COMPACTFUSION_DEBUG"):
                import traceback
                traceback.print_exc()
            raise
        msg = f"{type(e).__name__}: {first_line(e)}"
        note("fail", msg)
        if not errdir:
            print(f"compactfusion: error: rank {rank} stopped: {msg}", file=sys.stderr)
        time.sleep(PEER_FAILURE_GRACE_S)
        if not errdir:
            sys.exit(PEER_FAILURE_EXIT)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(PEER_FAILURE_EXIT)  # no interpreter teardown: seconds on a loaded machine, and it may touch the group

