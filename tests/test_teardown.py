"""Teardown: parallelize / unparallelize cycles must not leak process groups (descriptors, threads, sockets).

One 2-rank gloo spawn, bundled digits architecture (untrained): 20 cycles of parallelize, a 1-step
generation and unparallelize (which destroys the context's groups through ``ParallelContext.close``).
Before that close, 20 cycles grew descriptors 23 -> 283, threads 14 -> 194, TCP connections 7 -> 87.
"""
import pytest

from distributed import run_distributed

pytestmark = pytest.mark.dist
CYCLES = 20
SLACK = 3  # a lazily started thread or descriptor is not a leak; 20 leaked groups are dozens


def _resources():
    import psutil
    p = psutil.Process()
    return {"fds": p.num_fds(), "threads": p.num_threads(), "connections": len(p.net_connections(kind="inet"))}


def _cycles(rank, world):
    import torch

    import compactfusion as cf
    from compactfusion.bundled.digits import build_digits_pipeline

    pipe = build_digits_pipeline(0)
    cfg = cf.ParallelConfig(strategy="ring", timeout_s=60, compression=cf.CompressionConfig(codec="binary"))
    seen = []
    for _ in range(CYCLES + 1):  # cycle 0 is the warm-up (thread pools, lazy imports)
        cf.parallelize(pipe, cfg)
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt=7, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np")
        cf.unparallelize(pipe)
        seen.append(_resources())
    return {"first": seen[0], "last": seen[-1], "max": {k: max(s[k] for s in seen) for k in seen[0]}}


def test_unparallelize_releases_groups():
    for rank, rec in enumerate(run_distributed(_cycles, 2, timeout=400)):
        for key, before in rec["first"].items():
            assert rec["max"][key] <= before + SLACK, (rank, key, rec)
