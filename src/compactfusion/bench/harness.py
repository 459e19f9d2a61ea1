"""The benches' shared harness: one spawner for a gloo group of local worker processes.

Every bench that runs ranks on this machine (quality, latency, comm, text, quality_video, pipefusion, the
overhead run) calls :func:`run_ranks`, so start-up, failure reporting and clean-up are written once.
"""
from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from datetime import timedelta

__all__ = ["run_ranks"]


def _rank_main(fn, rank, world, port, threads, args, conn):
    code = 0
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(threads)
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timedelta(seconds=300))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
        try:
            msg = ("ok", fn(rank, world, *args))
        except BaseException as e:  # noqa: BLE001 - report to the parent
            msg = ("err", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            code = 1
        conn.send_bytes(pickle.dumps(msg))
        if conn.poll(600):
            conn.recv_bytes()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_ranks(fn, world: int, *args, timeout: float = 1800.0, threads: int | None = None) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh gloo processes; returns the per-rank results.

    ``fn`` must be importable at module level. Any failure kills every rank and raises RuntimeError with the
    failing rank's traceback; nothing is left running on timeout.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from multiprocessing.connection import wait as mp_wait

    threads = threads or max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=300))
    procs, conns = [], []
    for r in range(world):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_rank_main, args=(fn, r, world, store.port, threads, args, b), daemon=True)
        p.start()
        b.close()
        procs.append(p)
        conns.append(a)
    results, deadline = {}, time.monotonic() + timeout
    try:
        pending = dict(enumerate(conns))
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"ranks {sorted(pending)} did not finish within {timeout:.0f} s")
            ready = mp_wait(list(pending.values()) + [procs[r].sentinel for r in pending], timeout=left)
            for r, c in list(pending.items()):
                if c in ready or (procs[r].sentinel in ready and c.poll()):
                    try:
                        kind, val = pickle.loads(c.recv_bytes())
                    except (EOFError, OSError):
                        raise RuntimeError(f"rank {r} died (exit code {procs[r].exitcode})") from None
                    if kind != "ok":
                        raise RuntimeError(val)
                    results[r] = val
                    del pending[r]
                elif procs[r].sentinel in ready:
                    raise RuntimeError(f"rank {r} died without reporting (exit code {procs[r].exitcode})")
        for c in conns:
            try:
                c.send_bytes(b"exit")
            except OSError:
                pass
        for p in procs:
            p.join(20)
        return [results[r] for r in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in conns:
            c.close()
        del store


def reloaded_after(pipe, strategy: str, load):
    """The pipeline to run the next method on: ``pipe``, or a fresh ``load()`` after a pipefusion method (its
    stages released the other stages' weights, and parallelize refuses a model with released weights)."""
    if strategy != "pipefusion":
        return pipe
    fresh = load()
    fresh.set_progress_bar_config(disable=True)
    return fresh
