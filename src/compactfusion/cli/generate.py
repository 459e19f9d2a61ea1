"""``compactfusion generate``: one (parallel) generation, with bytes, time and fidelity in ``report.json``.

Runs in three ways: ``--nproc N`` self-launches N local workers with torch's elastic launcher (gloo on
CPU, NCCL on CUDA); under ``torchrun`` it uses the launcher's environment; otherwise it runs on one
process. Multi-node: ``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint`` pass through to the launcher.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .args import Parser, UsageError

STRATEGIES = ("none", "patch", "distrifusion", "ring", "ulysses", "usp")
MAX_LOCAL_PROCS = 64
#: Exit code of a rank that stopped because a peer failed or stalled (a CommError): a consequence, not a cause.
PEER_FAILURE_EXIT = 3
#: How long such a rank waits before exiting, so that the launcher (polling every 0.1 s) sees the rank that
#: failed first and reports it; the launcher terminates the waiting rank meanwhile.
PEER_FAILURE_GRACE_S = 2.0
BUNDLED_MARKER = Path(__file__).resolve().parent.parent / "bundled" / "assets" / "digits" / "digits_pipeline.json"


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
    if not 0 <= a.seed < 2**63:
        raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {a.seed}")
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
    cfg.resolve(world)
    return cfg, compression, link


def check_model_args(a, cfg, world: int) -> None:
    """Model-dependent checks that need no weights (so they fail in a second, before workers start).

    The bundled digits model: prompt, size, tokens vs ranks, CFG. A diffusers folder: it must be a
    transformer pipeline, and CFG parallel needs a pipeline with classifier-free guidance. Other checks
    (e.g. the spatial factor of a diffusers model) happen in the workers after loading.
    """
    digits = a.model is None or Path(a.model, "digits_pipeline.json").is_file()
    if digits:
        if a.model is None and not BUNDLED_MARKER.is_file():
            raise UsageError("the bundled digits model is not installed; pass --model DIR (a diffusers or digits "
                             "folder) or create it with `compactfusion train-digits --out DIR`")
        from ..bundled.digits import IMAGE_SIZE, PACK, parse_label
        try:
            parse_label(a.prompt)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--prompt: {e}") from None
        h, w = a.height or IMAGE_SIZE, a.width or IMAGE_SIZE
        for name, v in (("height", h), ("width", w)):
            if v % PACK:
                raise UsageError(f"--{name} {v} must be a multiple of {PACK} for the digits model")
        mesh = cfg.resolve(world)
        tokens = (h // PACK) * (w // PACK)
        if tokens < mesh.sp:
            raise UsageError(f"a {h}x{w} image has {tokens} tokens, fewer than the {mesh.sp} sequence-parallel "
                             f"ranks; use a larger --height/--width or fewer ranks")
        if a.cfg_parallel and a.guidance_scale is not None and a.guidance_scale <= 1.0:
            raise UsageError(f"--cfg-parallel needs classifier-free guidance, but --guidance-scale {a.guidance_scale:g} "
                             f"turns it off; use a scale > 1 or drop --cfg-parallel")
        return
    index = Path(a.model, "model_index.json")
    if not index.is_file():
        return  # a hub id (resolved from the local cache by the workers)
    try:
        info = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: cannot read {index}: {e}") from None
    cls = str(info.get("_class_name", "?"))
    if "transformer" not in info:
        raise UsageError(f"--model {a.model!r} is a {cls} without a `transformer` component; compactfusion runs "
                         f"diffusion-transformer pipelines (Flux, SD3, PixArt, ...), not UNet pipelines")
    if a.cfg_parallel and cls.startswith("Flux"):
        raise UsageError(f"--cfg-parallel needs a pipeline with classifier-free guidance; {cls} has none "
                         f"(guidance is distilled into the model); drop --cfg-parallel")


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
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise UsageError(f"--out {a.out!r} exists and is not a folder; pass a folder for the images and report")
    if a.nnodes > 1 and a.rdzv_backend == "static" and a.node_rank is None:
        raise UsageError("--rdzv-backend static with --nnodes > 1 needs --node-rank on every node")
    if a.node_rank is not None and not 0 <= a.node_rank < a.nnodes:
        raise UsageError(f"--node-rank must be between 0 and --nnodes - 1 ({a.nnodes - 1}), got {a.node_rank}")
    if under_launcher():
        world = int(os.environ["WORLD_SIZE"])
        if a.nproc not in (None, 1):
            raise UsageError("--nproc self-launches workers; under torchrun leave it out (torchrun sets the world)")
        cfg, _, _ = build_configs(a, world)
        check_model_args(a, cfg, world)
        return worker(vars(a), None)
    nproc = a.nproc or 1
    cfg, _, _ = build_configs(a, nproc * a.nnodes)  # fail fast, before any process starts
    check_model_args(a, cfg, nproc * a.nnodes)
    if nproc * a.nnodes == 1:
        return worker(vars(a), None)
    return launch(a, nproc)


def launch(a, nproc: int, fn=None) -> int:
    """Start nproc local workers running ``fn(vars(a), errdir)`` (default: ``worker``) through torch's
    elastic launcher (and join other nodes). If any rank dies or raises, the launcher stops the others and
    this prints one line naming that rank and why; exit code 2 for user errors, 1 otherwise."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not os.environ.get("COMPACTFUSION_DEBUG"):
        # The launcher logs every failure with a traceback of its own polling code; we print one line instead.
        for name in ("torch.distributed.elastic", "torch.multiprocessing"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        # Killed workers leave semaphores that multiprocessing's resource tracker reclaims with a warning.
        if "ignore:resource_tracker:UserWarning" not in sys.warnoptions:
            sys.warnoptions.append("ignore:resource_tracker:UserWarning")

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
        elastic_launch(config, fn or worker)(vars(a), errdir)
    except ChildFailedError as e:
        return _report_failure(e, errdir)
    finally:
        shutil.rmtree(errdir, ignore_errors=True)
    return 0


def _failure_reason(rank: int, failure, errdir: str) -> str:
    """Why ``rank`` failed: the worker's own note, the launcher's error record, or the signal / exit code."""
    note = Path(errdir, f"rank{rank:04d}.fail")
    if note.is_file() and note.read_text().strip():
        return note.read_text().strip()
    code = failure.exitcode
    if code is not None and code < 0:
        import signal
        try:
            return f"killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code}"
    msg = failure.message
    if isinstance(msg, dict):  # the elastic error file: {"message": "Type: text", "extraInfo": {...}}
        msg = msg.get("message", "")
    if isinstance(msg, str) and msg and not msg.startswith("To enable traceback"):
        return msg
    return f"exit code {code}"


def _report_failure(e, errdir: str) -> int:
    user_errors = sorted(Path(errdir).glob("rank*.txt"))
    if user_errors:
        print(f"compactfusion: error: {user_errors[0].read_text().strip()}", file=sys.stderr)
        return 2
    failures = sorted(e.failures.items())
    # The root cause, not a rank that merely stopped because a peer failed (they wait PEER_FAILURE_GRACE_S).
    primary = [(r, f) for r, f in failures if f.exitcode != PEER_FAILURE_EXIT] or failures
    rank, failure = primary[0]
    reason = _failure_reason(rank, failure, errdir).splitlines()[0]
    if failure.exitcode == PEER_FAILURE_EXIT:
        reason += " (it stopped because a peer failed or stalled)"
    elif Path(errdir, f"rank{rank:04d}.fail").is_file() and not os.environ.get("COMPACTFUSION_DEBUG"):
        reason += " (COMPACTFUSION_DEBUG=1 prints the traceback)"
    print(f"compactfusion: error: rank {rank} failed: {reason}; the other ranks were stopped", file=sys.stderr)
    return 1


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def worker(args: dict, errdir: str | None, body=None) -> int:
    """One rank running ``body(namespace)`` (default: ``run_worker``), with the failure protocol:

    * user errors (ValueError/TypeError/UsageError, incl. ConfigMismatchError) go to errdir and exit 2;
    * a CommError (a peer died, stalled or closed its connection) is a consequence: note it, wait
      PEER_FAILURE_GRACE_S so the launcher reports the rank that failed first, exit PEER_FAILURE_EXIT;
    * anything else is noted in errdir (one line for the launcher) and re-raised (traceback on stderr).
    Without errdir (one process, or torchrun) user errors propagate to ``run_guarded``.
    """
    from ..comm import CommError
    if body is None:
        from .worker import run_worker as body
    rank = os.environ.get("RANK", "0")
    if errdir:
        quiet_libraries()

    def note(suffix: str, text: str) -> None:
        if errdir:
            Path(errdir, f"rank{int(rank):04d}.{suffix}").write_text(text)

    try:
        return body(argparse.Namespace(**args))
    except (UsageError, ValueError, TypeError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if errdir:
            note("txt", f"rank {rank}: {msg}")
            sys.exit(2)
        raise
    except CommError as e:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        note("fail", msg)
        if not errdir:
            print(f"compactfusion: error: rank {rank} stopped: {msg}", file=sys.stderr)
        time.sleep(PEER_FAILURE_GRACE_S)
        sys.exit(PEER_FAILURE_EXIT)
    except Exception as e:
        note("fail", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if errdir and os.environ.get("COMPACTFUSION_DEBUG"):
            import traceback
            traceback.print_exc()
        raise
