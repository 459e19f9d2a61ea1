"""Start N local workers with torch's elastic agent and turn every way a launch can end into one line.

* **Binding.** Every store the launcher hosts listens on one address only: 127.0.0.1 for a local run (or a
  loopback ``--rdzv-endpoint``), the address the endpoint implies for multi-node (the endpoint's own
  address on the host node; for the workers' store, this node's address on the route to the endpoint).
  torch's stores would listen on all interfaces (``::``), so the rendezvous backend ``compactfusion`` (a
  c10d rendezvous over our own listening sockets) replaces its ``c10d``; gloo / NCCL get the matching
  interface (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, unless the user set them).
* **Failures.** A rank that fails names itself; ranks that merely stopped because a peer failed or
  stalled exit ``PEER_FAILURE_EXIT``; when only those failed, the stalled rank is named (a watcher records
  workers seen stopped, e.g. by SIGSTOP; otherwise the rank that reported nothing). Ranks are stopped
  with a short grace (``SHUTDOWN_GRACE_S``), since a stopped process never handles SIGTERM.
* **Signals.** Ctrl-C / SIGTERM of the launcher: one line, exit 130 / 143, workers stopped.
* **Rendezvous.** ``--rdzv-timeout`` bounds the wait for other nodes and an unreachable endpoint.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from datetime import timedelta
from pathlib import Path

from .config import DEFAULT_RDZV_TIMEOUT_S

#: Exit code of a rank that stopped because a peer failed or stalled (a CommError): a consequence, not a cause.
PEER_FAILURE_EXIT = 3
#: How long such a rank waits before exiting, so that the launcher (polling every 0.1 s) sees the rank that
#: failed first and reports it; the launcher terminates the waiting rank meanwhile.
PEER_FAILURE_GRACE_S = 2.0
#: SIGTERM -> SIGKILL grace for workers (torch's default is 30 s, all of it wasted on a stopped process).
SHUTDOWN_GRACE_S = 2
BACKEND = "compactfusion"
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129, signal.SIGQUIT: 131}


def _say(message: str) -> None:
    """One line on stderr, at most 300 characters."""
    print(message if len(message) <= 300 else message[:297] + "...", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- bound stores
def bound_store(host: str, port: int, timeout_s: float):
    """A TCPStore server listening on ``host`` only (torch's own binds every interface). Raises OSError if
    ``host:port`` is taken."""
    import torch.distributed as dist
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    # detach: the store's event loop owns (and closes) the descriptor from now on
    return dist.TCPStore(host, port, is_master=True, multi_tenant=True, master_listen_fd=sock.detach(),
                         timeout=timedelta(seconds=timeout_s))


def _is_local(host: str) -> bool:
    """Whether ``host`` resolves to an address of this machine."""
    import psutil
    try:
        ips = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return any(ipaddress.ip_address(ip.split("%")[0]).is_loopback or ip in mine for ip in ips)


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(ai[4][0].split("%")[0]).is_loopback for ai in socket.getaddrinfo(host, None))
    except OSError:
        return False


def route_address(host: str, port: int) -> str:
    """This node's address on the route to ``host`` (a UDP connect sends nothing)."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return s.getsockname()[0]


def interface_of(ip: str) -> str | None:
    import psutil
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addrs):
            return name
    return None


def _create_handler(params):
    """Rendezvous ``compactfusion``: torch's dynamic (c10d) rendezvous, with both stores bound to one address."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler, RendezvousTimeout
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    timeout_s = float(params.config.get("join_timeout", DEFAULT_RDZV_TIMEOUT_S))
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=29400)
    store = None
    if _is_local(host):
        try:
            store = bound_store(host, port, timeout_s)
        except OSError:  # another launcher on this machine hosts it (two "nodes" on one host)
            store = None
    if store is None:
        import torch.distributed as dist
        from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
        try:
            with _quiet_stderr_fd():  # torch's C++ client logs each failed attempt with a stack trace
                store = dist.TCPStore(host, port, is_master=False, multi_tenant=True,
                                      timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, TimeoutError, OSError) as e:  # DistStoreError/DistNetworkError are RuntimeErrors
            raise RendezvousConnectionError(f"cannot reach the rendezvous store at {host}:{port}: "
                                            f"{str(e).splitlines()[0][:100] if str(e) else type(e).__name__}") from None

    class Handler(DynamicRendezvousHandler):
        def _create_tcp_store_server(self, master_addr, master_port):  # the store the workers bootstrap from
            return bound_store(master_addr, master_port, timeout_s)

        def get_backend(self) -> str:
            return BACKEND

    return Handler.from_backend(params.run_id, store, C10dRendezvousBackend(store, params.run_id), params.min_nodes,
                                params.max_nodes, params.local_addr,
                                RendezvousTimeout(join=timedelta(seconds=timeout_s)))


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Send file descriptor 2 to /dev/null meanwhile (C++ logging bypasses Python's sys.stderr)."""
    if os.environ.get("COMPACTFUSION_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _register_backend() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    rendezvous_handler_registry.register(BACKEND, _create_handler)  # idempotent: same creator every time


# ---------------------------------------------------------------------------------------------- launch
def _quiet_launcher() -> None:
    if os.environ.get("COMPACTFUSION_DEBUG"):
        return
    # The launcher logs every failure with a traceback of its own polling code; we print one line instead.
    # torch's elastic modules set their own logger levels, so every logger under those names is silenced.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # Killed workers leave semaphores that multiprocessing's resource tracker reclaims with a warning.
    if "ignore:resource_tracker:UserWarning" not in sys.warnoptions:
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def network_env(endpoint: str | None) -> dict:
    """Where this node listens: (local_addr, {env for the workers}). Loopback unless the endpoint is remote."""
    if endpoint is None or is_loopback(endpoint.rpartition(":")[0].strip("[]")):
        return "127.0.0.1", {"GLOO_SOCKET_IFNAME": interface_of("127.0.0.1") or "lo",
                             "NCCL_SOCKET_IFNAME": interface_of("127.0.0.1") or "lo"}
    host, _, port = endpoint.rpartition(":")
    addr = route_address(host.strip("[]"), int(port))
    iface = interface_of(addr)
    return addr, ({"GLOO_SOCKET_IFNAME": iface, "NCCL_SOCKET_IFNAME": iface} if iface else {})


def launch(a, nproc: int, fn=None) -> int:
    """Start nproc local workers running ``fn(args, errdir)`` (default: ``generate.worker``) through torch's
    elastic agent (and join other nodes). Returns the exit code; prints one line on failure."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if fn is None:
        from .generate import worker as fn
    _quiet_launcher()
    rdzv_timeout = float(getattr(a, "rdzv_timeout", DEFAULT_RDZV_TIMEOUT_S))
    local_addr, env = network_env(a.rdzv_endpoint)
    env = {k: v for k, v in env.items() if k not in os.environ}  # the user's choice wins
    endpoint = a.rdzv_endpoint or f"127.0.0.1:{_free_port()}"
    static = a.rdzv_backend == "static"
    rdzv_configs = {"rank": a.node_rank or 0, "timeout": int(rdzv_timeout)} if static else \
        {"join_timeout": rdzv_timeout}
    if not static:  # torch's static rendezvous is used as is (see docs/reliability.md: trust model)
        _register_backend()
    run_id = a.rdzv_id or ("compactfusion-" + (endpoint if a.rdzv_endpoint else uuid.uuid4().hex[:8])).replace(":", "-")
    config = LaunchConfig(min_nodes=a.nnodes, max_nodes=a.nnodes, nproc_per_node=nproc, run_id=run_id,
                          rdzv_backend="static" if static else BACKEND, rdzv_endpoint=endpoint,
                          rdzv_configs=rdzv_configs, max_restarts=0, monitor_interval=0.1, start_method="spawn",
                          local_addr=local_addr, shutdown_timeout=SHUTDOWN_GRACE_S)
    errdir = tempfile.mkdtemp(prefix="compactfusion-err-")
    stopped: dict[int, str] = {}
    done = threading.Event()
    watcher = threading.Thread(target=_watch_stopped, args=(errdir, stopped, done), daemon=True)
    watcher.start()
    args = dict(vars(a), _cf_env=env)
    try:
        elastic_launch(config, fn)(args, errdir)
        return 0
    except ChildFailedError as e:
        done.set()
        return _report_failure(e, errdir, stopped, a.timeout if hasattr(a, "timeout") else None)
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        _say(f"compactfusion: interrupted by {sig.name}; stopped the workers")
        return SIGNAL_EXIT.get(sig, 128 + int(sig))
    except RendezvousError as e:
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        _say(f"compactfusion: error: rendezvous at {endpoint} did not complete within {rdzv_timeout:g} s "
             f"({type(e).__name__}: {first}); start the same command on all {a.nnodes} nodes, check "
             f"--rdzv-endpoint, or raise --rdzv-timeout")
        return 1
    finally:
        done.set()
        shutil.rmtree(errdir, ignore_errors=True)


def _watch_stopped(errdir: str, stopped: dict, done: threading.Event) -> None:
    """Record ranks whose process is stopped (SIGSTOP, a debugger), the only moment their state can be seen;
    once another worker has exited, resume them (SIGCONT) so that the agent's SIGTERM ends them at once: its
    failure path waits a fixed 30 s before SIGKILL (``LocalElasticAgent._stop_workers`` ignores the
    configured shutdown timeout), and a stopped process never acts on SIGTERM."""
    import psutil
    gone = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    while not done.wait(0.2):
        status = {}
        for f in Path(errdir).glob("rank*.pid"):
            try:
                rank, pid = int(f.stem[4:]), int(f.read_text())
                status[rank] = (pid, psutil.Process(pid).status())
            except psutil.NoSuchProcess:
                status[rank] = (None, psutil.STATUS_DEAD)
            except (OSError, ValueError, psutil.Error):
                continue
        for rank, (_, st) in status.items():
            if st == psutil.STATUS_STOPPED:
                stopped.setdefault(rank, "stopped")
        if any(st in gone for _, st in status.values()):
            for pid, st in status.values():
                if st == psutil.STATUS_STOPPED:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except OSError:
                        pass


# ---------------------------------------------------------------------------------------------- failure report
def _failure_reason(rank: int, failure, errdir: str) -> str:
    """Why ``rank`` failed: the worker's own note, the launcher's error record, or the signal / exit code."""
    note = Path(errdir, f"rank{rank:04d}.fail")
    if note.is_file() and note.read_text().strip():
        return note.read_text().strip()
    code = failure.exitcode
    if code is not None and code < 0:
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


def _report_failure(e, errdir: str, stopped: dict, timeout_s) -> int:
    user_errors = sorted(Path(errdir).glob("rank*.txt"))
    if user_errors:
        _say(f"compactfusion: error: {user_errors[0].read_text().strip()}")
        return 2
    failures = sorted(e.failures.items())
    # The root cause, not a rank that merely stopped because a peer failed (they wait PEER_FAILURE_GRACE_S).
    primary = [(r, f) for r, f in failures if f.exitcode != PEER_FAILURE_EXIT]
    if not primary:
        return _report_stall(failures, errdir, stopped, timeout_s)
    rank, failure = primary[0]
    reason = _failure_reason(rank, failure, errdir).splitlines()[0][:200]
    if Path(errdir, f"rank{rank:04d}.fail").is_file() and not os.environ.get("COMPACTFUSION_DEBUG"):
        reason += " (COMPACTFUSION_DEBUG=1 prints the traceback)"
    _say(f"compactfusion: error: rank {rank} failed: {reason}; the other ranks were stopped")
    return 1


def _report_stall(failures, errdir: str, stopped: dict, timeout_s) -> int:
    """Only ranks that timed out (or lost a peer) failed: name the rank they were waiting for."""
    waiting = [r for r, _ in failures]
    started = {int(f.stem[4:]) for f in Path(errdir).glob("rank*.pid")}
    noted = {int(f.stem[4:]) for f in Path(errdir).glob("rank*.fail")}
    silent = sorted(started - noted - set(waiting))
    suspects, how = (sorted(stopped), "was stopped (SIGSTOP or a debugger)") if stopped else \
        (silent, "stopped making progress")
    wait = f"{timeout_s:g} s" if timeout_s else "the timeout"
    if suspects:
        names = ", ".join(map(str, suspects))
        _say(f"compactfusion: error: rank{'s' if len(suspects) > 1 else ''} {names} {how}: ranks "
             f"{', '.join(map(str, waiting))} timed out after {wait} waiting for it; the other ranks were stopped")
        return 1
    rank, failure = failures[0]
    reason = _failure_reason(rank, failure, errdir).splitlines()[0][:200]
    _say(f"compactfusion: error: rank {rank} failed: {reason} (it stopped because a peer on another node failed "
         f"or stalled); the other ranks were stopped")
    return 1
