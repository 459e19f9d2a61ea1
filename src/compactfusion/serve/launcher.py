"""``compactfusion serve --nproc N``: N local ranks as child processes, supervised by this process.

Not torch's elastic agent: it stops every worker ~0.1 s after one fails (and SIGKILLs after 2 s on
SIGTERM), which would cut a drain short and leave no time to answer the in-flight request. Here:
* the rendezvous store listens on 127.0.0.1 only (``cli.launch.bound_store``), gloo on loopback;
* SIGTERM/SIGINT go to rank 0 only, which drains and tells the other ranks to stop; a second signal
  kills every rank;
* a rank that dies lets rank 0 notice (a CommError within the collective timeout) and answer; if rank 0
  is still alive ``timeout + EXIT_GRACE_S`` later, every rank is killed;
* children die with this process (``PR_SET_PDEATHSIG``), so no rank outlives a killed supervisor.
Returns rank 0's exit code, or 1 if another rank failed.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

EXIT_GRACE_S = 10.0
POLL_S = 0.1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def launch_local(argv: list[str], nproc: int, timeout_s: float) -> int:
    from ..cli.launch import bound_store, network_env
    store = bound_store("127.0.0.1", 0, max(60.0, timeout_s))
    env = dict(os.environ, WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               COMPACTFUSION_SERVE_STORE=f"127.0.0.1:{store.port}")
    env.update({k: v for k, v in network_env(None)[1].items() if k not in os.environ})
    cmd = [sys.executable, "-m", "compactfusion.cli.main", "serve", *argv]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), start_new_session=True,
                              preexec_fn=_die_with_parent) for r in range(nproc)]
    signals = []

    def forward(signum, frame):
        signals.append(signum)
        if len(signals) == 1 and procs[0].poll() is None:
            procs[0].send_signal(signal.SIGTERM)  # drain
        else:
            _kill(procs)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        first_failure = None
        while procs[0].poll() is None:
            if first_failure is None and any(p.poll() not in (None, 0) for p in procs[1:]):
                first_failure = time.monotonic()
            if first_failure is not None and time.monotonic() - first_failure > timeout_s + EXIT_GRACE_S:
                print("compactfusion serve: rank 0 did not exit after a peer failed; stopping every rank",
                      file=sys.stderr, flush=True)
                _kill(procs)
                break
            time.sleep(POLL_S)
        # after a drain the followers got "stop"; after a failure they are of no use (and may be stopped)
        deadline = time.monotonic() + (timeout_s + EXIT_GRACE_S if procs[0].returncode == 0 else 0.5)
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        _kill(procs)
        codes = [p.wait() for p in procs]
    finally:
        _kill(procs)
        for s, h in old.items():
            signal.signal(s, h)
    if codes[0] != 0:
        return codes[0] if codes[0] > 0 else 1
    return 0 if all(c == 0 for c in codes) else 1


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
