"""One rank of ``compactfusion serve``: rank 0 serves HTTP and drives the group; the others follow it.

Messages from rank 0 (``Communicator.broadcast_object``: tagged JSON, a length then the bytes, with a
timeout): ``{"op": "beat"}`` every ``--heartbeat`` s while idle, ``{"op": "run", "jobs": [...]}``, and
``{"op": "stop"}``. After a beat or a run every rank joins one ``all_gather_object`` with its status
(and byte counts), so rank 0 hears from every rank at least once per heartbeat: a rank that died or
stalled shows up as a CommError within the collective timeout.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict
from datetime import timedelta

import numpy as np

from ..comm import CommError

#: Exit code of rank 0 when a peer failed (the supervisor restarts the server).
FAILED_EXIT = 1
#: After a rank failure, /health answers 503 this long before the server exits (a load balancer sees it).
FAIL_LINGER_S = 2.0


def _png_b64(img: np.ndarray) -> str:
    from PIL import Image
    a = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Channel:
    """Rank 0 -> all messages and all -> rank 0 replies over WORLD; a no-op group of one without peers."""

    def __init__(self, world: int, timeout_s: float):
        self.world = world
        if world > 1:
            from ..comm import Communicator
            self.comm = Communicator(None, None, None, timeout_s)

    def broadcast(self, obj=None):
        return obj if self.world == 1 else self.comm.broadcast_object(obj, src=0)

    def gather(self, obj) -> list:
        return [obj] if self.world == 1 else self.comm.all_gather_object(obj)


def _init_group(a, world: int, rank: int, device) -> None:
    import torch.distributed as dist
    from ..comm.device import init_distributed  # CUDA: cpu:gloo,cuda:nccl bound to the device
    store_addr = os.environ.get("COMPACTFUSION_SERVE_STORE")
    if store_addr:  # our own launcher hosts the store, bound to 127.0.0.1 (launcher.py)
        host, _, port = store_addr.rpartition(":")
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=max(60.0, a.timeout)))
        init_distributed(device, a.timeout, store=store, rank=rank, world_size=world)
    else:  # torchrun's environment
        init_distributed(device, a.timeout)


def _run_batch(engine, jobs: list[dict]) -> tuple[dict, list | None]:
    """(status for the gather, images per job or None). Only CommErrors escape (the group is broken)."""
    t0 = time.perf_counter()
    try:
        images, local = engine.run(jobs)
        if not all(np.isfinite(x).all() for x in images):
            raise ValueError("the generated images are not finite (NaN/inf)")
        return dict(ok=True, wall_s=time.perf_counter() - t0, **local), images
    except CommError:
        raise
    except Exception as e:  # noqa: BLE001 - a request error: reported, the group carries on
        if _is_group_failure(e):
            raise
        kind = "user" if isinstance(e, (ValueError, TypeError)) else "internal"
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__)[:300]
        return dict(ok=False, kind=kind, error=f"{type(e).__name__}: {msg}", wall_s=time.perf_counter() - t0), None


def _is_group_failure(e: BaseException) -> bool:
    import torch.distributed as dist
    return isinstance(e, (CommError, getattr(dist, "DistError", ()), getattr(dist, "DistBackendError", ())))


def follower_loop(engine, chan: Channel) -> int:
    while True:
        msg = chan.broadcast(None)
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "beat":
            chan.gather({"ok": True})
        elif op == "run":
            status, _ = _run_batch(engine, msg["jobs"])
            chan.gather(status)
        elif op == "stop":
            return 0
        else:
            raise ValueError(f"unexpected control message from rank 0: {msg!r}"[:200])


def blame(ranks: list[dict], err: BaseException) -> str:
    """Name the rank that failed: a local peer process that is gone or stopped, else the error itself."""
    import psutil
    me = socket.gethostname()
    found = []
    for r in ranks[1:]:
        if r.get("host") != me:
            continue
        try:
            st = psutil.Process(r["pid"]).status()
        except psutil.Error:
            st = "dead"
        if st in ("dead", psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            found.append(f"rank {r['rank']} died (pid {r['pid']})")
        elif st == psutil.STATUS_STOPPED:
            found.append(f"rank {r['rank']} stalled (pid {r['pid']} is stopped)")
    text = (str(err).splitlines()[0] if str(err) else type(err).__name__)[:200]
    return ("; ".join(found) + f" ({type(err).__name__}: {text})") if found else \
        f"a peer rank failed or stalled: {type(err).__name__}: {text}"


class Leader:
    """Rank 0: the scheduler loop on the main thread, uvicorn on a second thread."""

    def __init__(self, a, state, engine, chan: Channel, http):
        self.a, self.state, self.engine, self.chan, self.http = a, state, engine, chan, http
        self.drain = threading.Event()

    def request_drain(self, signum=None, frame=None) -> None:
        if self.drain.is_set():
            return
        self.drain.set()
        # close() takes the scheduler lock: not from inside a signal handler on the thread that may hold it
        threading.Thread(target=self._close_queue, args=("the server is shutting down",), daemon=True).start()

    def _close_queue(self, reason: str, status: int = 503) -> None:
        for e in self.state.scheduler.close(reason):
            self.state.metrics.requests.labels("failed").inc()
            e.future.set_result((status, f"not run: {reason}"))

    def loop(self) -> int:
        """Run until a drain ends (0) or the group breaks (FAILED_EXIT: everyone answered first)."""
        batch: list = []
        try:
            while True:
                batch = []
                if self._step_idle_or_stop():
                    return 0
                batch = self._take()
                if batch:
                    self._run(batch)
        except Exception as err:  # noqa: BLE001 - the group is broken: answer everyone, then exit
            if not _is_group_failure(err):
                raise
            reason = blame(self.state.ranks, err)
            self.state.set("failed", reason)
            for e in batch:
                self.state.metrics.requests.labels("failed").inc()
                e.future.set_result((500, f"generation failed: {reason}"))
            self._close_queue(f"a rank failed: {reason}")
            return FAILED_EXIT

    def _step_idle_or_stop(self) -> bool:
        """True once drained (and the other ranks told to stop)."""
        if self.drain.is_set() and self.state.scheduler.in_flight == 0:
            self.state.set("draining", "the server is shutting down")
            self._close_queue("the server is shutting down")
            self.chan.broadcast({"op": "stop"})
            return True
        return False

    def _take(self) -> list:
        sched = self.state.scheduler
        batch = sched.next_batch(self.a.heartbeat)
        self.state.metrics.queue_depth.set(sched.depth())
        if not batch and not self.drain.is_set():  # idle: every rank answers within the heartbeat
            self.chan.broadcast({"op": "beat"})
            self.chan.gather({"ok": True})
        return batch

    def _run(self, batch: list) -> None:
        sched, m = self.state.scheduler, self.state.metrics
        m.in_flight.set(sum(e.job.n for e in batch))
        m.batch_size.observe(len(batch))
        try:
            jobs = [asdict(e.job) for e in batch]
            self.chan.broadcast({"op": "run", "jobs": jobs})
            status, images = _run_batch(self.engine, jobs)
            reports = self.chan.gather(status)
        finally:
            sched.finished(time.monotonic() - batch[0].started)
            m.in_flight.set(0)
        self._answer(batch, reports, images)

    def _answer(self, batch, reports: list[dict], images) -> None:
        m = self.state.metrics
        bad = [(r, s) for r, s in enumerate(reports) if not s.get("ok")]
        if bad:
            r, s = bad[0]
            code = 400 if s.get("kind") == "user" else 500
            for e in batch:
                m.requests.labels("failed").inc()
                e.future.set_result((code, f"rank {r}: {s['error']}"))
            return
        total_n = sum(e.job.n for e in batch)
        sent = sum(s["bytes_sent"] for s in reports)
        raw = sum(s["bytes_uncompressed"] for s in reports)
        link = max(s["modeled_comm_s"] for s in reports)
        wall = max(s["wall_s"] for s in reports)
        for e, imgs in zip(batch, images):
            share = e.job.n / total_n
            usage = {"bytes_sent": int(round(sent * share)), "bytes_uncompressed": int(round(raw * share)),
                     "compression_ratio": round(raw / sent, 3) if sent else 1.0,
                     "wall_time_s": round(wall, 4), "queue_time_s": round(e.started - e.enqueued, 4),
                     "modeled_link_s": round(link * share, 6), "batch_requests": len(batch),
                     "codec": e.job.codec, "world_size": self.chan.world}
            m.observe_usage(usage)
            m.requests.labels("completed").inc()
            e.future.set_result((200, {"data": [{"b64_json": _png_b64(x)} for x in imgs], "usage": usage}))


def _start_http(a, state):
    """Bind first (a taken port fails before the model loads), then serve from a thread."""
    import uvicorn
    from .app import create_app
    sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((a.host, a.port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {a.host}:{a.port} ({e.strerror}); pick another --port") from None
    sock.listen(2048)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=max(5, int(a.timeout))))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    thread.start()
    print(f"compactfusion serve: listening on http://{a.host}:{port}", flush=True)
    return server, thread


def run_rank(a: argparse.Namespace) -> int:
    """Body of every rank (``--nproc`` children, torchrun workers, or the only process)."""
    import torch
    from ..cli.config import torch_dtype
    from ..cli.worker import configure_threads
    from ..loading import spatial_factor  # noqa: F401  (import cost before the server says ready)
    from .engine import Engine

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    configure_threads(device)
    import faulthandler
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack (a stuck server)
    leader = http = None
    if rank == 0:
        state = make_state(a, world)
        http = _start_http(a, state)
    else:
        for sig in (signal.SIGTERM, signal.SIGINT):  # followers stop when rank 0 says so (or when it is gone)
            signal.signal(sig, signal.SIG_IGN)
    try:
        if world > 1:
            _init_group(a, world, rank, device)
        chan = Channel(world, a.timeout)
        engine, load_error = None, None
        try:
            engine = Engine(a, world, device, torch_dtype(a.dtype, cuda))
        except (ValueError, TypeError, OSError) as e:
            load_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        ranks = chan.gather({"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "error": load_error})
        errors = [f"rank {r['rank']}: {r['error']}" for r in ranks if r["error"]]
        if errors:
            raise ValueError(f"the model did not load: {errors[0]}")
        engine.ensure_codec(a.codec)  # collective: only once every rank has the model
        if rank != 0:
            return follower_loop(engine, chan)
        state.ranks = [{k: r[k] for k in ("rank", "host", "pid")} for r in ranks]
        configure_limits(state, engine)
        leader = Leader(a, state, engine, chan, http)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, leader.request_drain)
        state.set("ready")
        print(f"compactfusion serve: ready ({world} rank{'s' if world > 1 else ''}, codecs "
              f"{', '.join(state.limits.codecs)})", flush=True)
        return leader.loop()
    finally:
        if http is not None:
            if state.status == "failed":
                time.sleep(FAIL_LINGER_S)
            if state.status == "ready":
                state.set("failed", "the server stopped")
            http[0].should_exit = True
            http[1].join(timeout=max(5.0, a.timeout))
        if http is None or state.status != "failed":  # a broken group is not torn down (that can wait on the dead)
            _teardown(world)


def _teardown(world: int) -> None:
    import torch.distributed as dist
    if world > 1 and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group: the process exits anyway
            pass


def make_state(a, world: int):
    from .app import ServerState
    from .metrics import Metrics
    from .scheduler import Scheduler
    from .schemas import Limits
    limits = Limits(max_n=a.max_n, max_steps=a.max_steps, max_side=a.max_size, default_steps=a.default_steps,
                    codecs=tuple(a.allow_codecs), default_codec=a.codec, model_id=a.model_id)
    return ServerState(limits=limits, scheduler=Scheduler(a.max_queue, a.max_batch, a.batch_wait_ms / 1000.0),
                       metrics=Metrics(), api_key=a.api_key, world_size=world)


def configure_limits(state, engine) -> None:
    """Model-dependent limits (size multiple, default size, negative prompt, prompt check) once it loaded."""
    from dataclasses import replace
    from ..bundled.digits import DigitsPipeline, parse_label
    from .schemas import request_model
    lim = replace(state.limits, size_multiple=engine.factor, default_size=engine.size,
                  negative_prompt=engine.takes_negative_prompt)
    state.limits = lim
    state.check_prompt = parse_label if isinstance(engine.pipe, DigitsPipeline) else None
    state.request_model = request_model(lim, state.check_prompt)


def main_rank(a) -> int:
    """Entry for one rank with one-line errors. After a peer failure the process leaves at once
    (``os._exit``): destroying a broken group at interpreter exit can wait on the dead or stopped peer."""
    try:
        code = run_rank(a)
    except CommError as e:
        print(f"compactfusion serve: rank {os.environ.get('RANK', '0')} stopped: {str(e).splitlines()[0][:250]}",
              file=sys.stderr, flush=True)
        code = FAILED_EXIT
    if code == FAILED_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
