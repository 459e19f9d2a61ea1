"""Run a function on W gloo ranks in fresh processes, for tests. Never hangs.

    results = run_distributed(fn, world_size, *args, timeout=120, **kwargs)

Each rank calls ``fn(rank, world_size, *args, **kwargs)`` after ``init_process_group("gloo")`` and
returns a picklable value; the parent gets the list of per-rank values. ``fn`` must be importable
(module level). Any rank's exception is re-raised in the parent as :class:`RankFailed` carrying the
rank's traceback (the original exception is chained as ``__cause__`` when it pickles).

How it stays hang-free and race-free:
* the parent hosts the rendezvous ``TCPStore`` on port 0, so the OS picks a free port and no two
  test runs can race for one;
* ranks report over pipes; after all have reported, the parent tells them to tear down
  (``destroy_process_group`` then ``os._exit``), so no rank closes its connections while a peer
  still uses them, and the parent can check the group exits cleanly;
* on the first failure, or when ``timeout`` expires, every child is killed.
* ranks are forked from one forkserver per test session that imported torch, diffusers and
  compactfusion once (a fresh interpreter started by the parent, not a copy of the pytest process), so a
  group starts in well under a second instead of re-importing everything per rank.
Each group still costs its set-up and teardown, so group several checks into one call.
"""
from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait as mp_wait
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["run_distributed", "RankFailed"]

# Imported once by the forkserver; every rank forks with them loaded. Names that fail to import are skipped.
PRELOAD = ["torch", "torch.distributed", "numpy", "diffusers", "compactfusion", "compactfusion.testing.tiny",
           "distributed"]


class RankFailed(RuntimeError):
    """A rank raised, died, or did not finish in time."""


def _child(fn: Callable, rank: int, world: int, port: int, pg_timeout: float, args: tuple, kwargs: dict, conn) -> None:
    code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timedelta(seconds=pg_timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout))
        try:
            result = fn(rank, world, *args, **kwargs)
            msg = ("ok", rank, result)
            try:
                data = pickle.dumps(msg)
            except Exception as e:  # noqa: BLE001 - report unpicklable results as a failure
                raise TypeError(f"rank {rank} returned an unpicklable value: {e}") from e
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            tb = traceback.format_exc()
            try:
                exc_bytes = pickle.dumps(e)
            except Exception:  # noqa: BLE001
                exc_bytes = None
            data = pickle.dumps(("err", rank, (tb, exc_bytes)))
            code = 1
        conn.send_bytes(data)
        # Wait for the parent's go-ahead before tearing down (peers may still be mid-op).
        if conn.poll(pg_timeout + 30):
            conn.recv_bytes()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - setup failure: print; the parent sees the exit code
        traceback.print_exc()
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown: nothing left to run, and it cannot hang


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120, **kwargs: Any) -> list:
    import torch.distributed as dist

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the forkserver starts (first call of the session)
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    pg_timeout = max(5.0, min(float(timeout), 60.0))
    procs, conns = [], []
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=_child, args=(fn, rank, world_size, store.port, pg_timeout, args, kwargs, child_end),
                        daemon=True, name=f"rank{rank}")
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)

    def kill_all() -> None:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)

    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    failures: list[tuple[int, str, BaseException | None]] = []
    pending = {c: r for r, c in enumerate(conns)}
    sentinels = {p.sentinel: r for r, p in enumerate(procs)}
    grace_until = None
    try:
        while pending:
            now = time.monotonic()
            limit = deadline if grace_until is None else min(deadline, grace_until)
            if now >= limit:
                break
            ready = mp_wait(list(pending) + [p.sentinel for r, p in enumerate(procs) if conns[r] in pending],
                            timeout=limit - now)
            for obj in ready:
                if obj in pending:
                    r = pending.pop(obj)
                    try:
                        kind, _, payload = pickle.loads(obj.recv_bytes())
                    except (EOFError, OSError):
                        failures.append((r, f"rank {r} died without reporting (exit code {procs[r].exitcode})", None))
                        continue
                    if kind == "ok":
                        results[r] = payload
                    else:
                        tb, exc_bytes = payload
                        exc = None
                        if exc_bytes is not None:
                            try:
                                exc = pickle.loads(exc_bytes)
                            except Exception:  # noqa: BLE001
                                exc = None
                        failures.append((r, tb, exc))
                elif obj in sentinels:
                    r = sentinels[obj]
                    c = conns[r]
                    if c in pending and not c.poll():  # exited without a report: crash or signal
                        pending.pop(c)
                        procs[r].join(1)
                        failures.append((r, f"rank {r} died without reporting (exit code {procs[r].exitcode})", None))
            if failures and grace_until is None:
                grace_until = time.monotonic() + 1.0  # let peers report their side (often the root cause)
        if failures:
            kill_all()
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb, _ in failures)
            raise RankFailed(f"{len(failures)} rank(s) failed: {[r for r, _, _ in failures]}\n{text}") from failures[0][2]
        if pending:
            kill_all()
            raise RankFailed(f"timed out after {timeout} s; ranks {sorted(pending.values())} did not finish")
        # Everyone reported: release them together, then require a clean exit.
        for c in conns:
            try:
                c.send_bytes(b"exit")
            except OSError:
                pass
        end = time.monotonic() + 15
        for p in procs:
            p.join(max(0.1, end - time.monotonic()))
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            kill_all()
            raise RankFailed(f"ranks did not exit cleanly after finishing (rank, exit code): {bad}")
        return [results[r] for r in range(world_size)]
    finally:
        kill_all()
        for c in conns:
            c.close()
        del store
