"""``compactfusion serve``: the model loaded on a group of ranks behind an OpenAI-compatible images API.

    compactfusion serve --nproc 2 --codec binary --allow-codecs none,binary [--port 8000] [--api-key KEY]

Same model/parallelism/compression flags as ``generate``. ``--nproc N`` starts N local ranks (supervised,
see ``serve/launcher.py``); under torchrun (also multi-node) every rank runs this command. Rank 0 listens
on ``--host`` (127.0.0.1 by default) and ``--port`` (0: any free port, printed on stdout).
"""
from __future__ import annotations

import argparse
import os

from .args import Parser, UsageError
from .config import add_common_args, add_launch_args, build_configs


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compactfusion serve", description=__doc__.splitlines()[0])
    add_common_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    s.add_argument("--api-key", default=os.environ.get("COMPACTFUSION_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $COMPACTFUSION_API_KEY)")
    s.add_argument("--model-id", default="compactfusion-digits", help="the id GET /v1/models reports")
    s.add_argument("--allow-codecs", default=None,
                   help="comma list of codecs a request may choose (default: --codec, plus none)")
    s.add_argument("--max-queue", type=int, default=64, help="queued requests before 429")
    s.add_argument("--max-batch", type=int, default=1,
                   help="images of compatible requests run in one pipeline call (1: no batching)")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a lone request waits for company")
    s.add_argument("--max-n", type=int, default=4)
    s.add_argument("--max-steps", type=int, default=100)
    s.add_argument("--max-size", type=int, default=2048, help="largest width or height")
    s.add_argument("--default-steps", type=int, default=20)
    s.add_argument("--heartbeat", type=float, default=None,
                   help="seconds between idle heartbeats (default: min(5, --timeout / 4))")
    add_launch_args(p)
    return p


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_args(a, world: int) -> None:
    """Every check that needs no weights; fills in allow_codecs and heartbeat."""
    try:
        import fastapi, prometheus_client, uvicorn  # noqa: F401,E401
    except ImportError as e:
        raise UsageError(f"serve needs the 'serve' extra ({e.name} is missing): pip install 'compactfusion[serve]'")
    from ..serve.engine import codec_namespace
    codecs = [c.strip() for c in (a.allow_codecs or f"{a.codec},none").split(",") if c.strip()]
    a.allow_codecs = list(dict.fromkeys([a.codec] + codecs))  # the default codec is always allowed
    if world == 1 and a.allow_codecs != ["none"]:
        raise UsageError("compression needs peers: serve with --nproc 2 or more, or leave --codec/--allow-codecs out")
    for codec in a.allow_codecs:
        build_configs(codec_namespace(a, codec), world)  # a bad codec or flag fails here, before any process
    for name in ("max_queue", "max_batch", "max_n", "max_steps", "max_size", "default_steps"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.default_steps > a.max_steps:
        raise UsageError(f"--default-steps ({a.default_steps}) must not exceed --max-steps ({a.max_steps})")
    if not 0 <= a.port < 65536:
        raise UsageError(f"--port must be between 0 and 65535, got {a.port}")
    if a.batch_wait_ms < 0:
        raise UsageError(f"--batch-wait-ms must be >= 0, got {a.batch_wait_ms}")
    if a.heartbeat is None:
        a.heartbeat = min(5.0, a.timeout / 4)
    if not 0 < a.heartbeat < a.timeout:
        raise UsageError(f"--heartbeat must be positive and below --timeout ({a.timeout:g} s), got {a.heartbeat:g}")
    if a.api_key is not None and not a.api_key:
        raise UsageError("--api-key must not be empty")


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(argv or [])
    a = build_parser().parse_args(argv)
    if under_launcher():
        if a.nproc not in (None, 1) and "COMPACTFUSION_SERVE_STORE" not in os.environ:
            raise UsageError("--nproc self-launches ranks; under torchrun leave it out (torchrun sets the world)")
        check_args(a, int(os.environ["WORLD_SIZE"]))
        from ..serve.worker import main_rank
        return main_rank(a)
    nproc = a.nproc or 1
    if a.nnodes > 1:
        raise UsageError("multi-node serving: start `compactfusion serve` under torchrun on every node")
    check_args(a, nproc)
    if nproc == 1:
        from ..serve.worker import main_rank
        return main_rank(a)
    from ..serve.launcher import launch_local
    return launch_local(argv, nproc, a.timeout)
