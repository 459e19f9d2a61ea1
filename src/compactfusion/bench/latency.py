"""``compactfusion bench latency``: wall time per image vs link bandwidth/latency on the digits model.

Measured ("sleep" mode): ranks are gloo processes on this machine; compactfusion's link model pads every
op's real time up to ``latency + bytes / bandwidth`` per message (one outbound link per rank), so overlap
(ring hops behind block attention, DistriFusion's gather behind the whole step) is real. Each
configuration generates one image (seed 0); fast configurations take the best of ``--reps``. diffusers'
native context parallelism runs in the same workers with the same link model applied at its
communication points (see ``bench/peers.py``).

Extended ("virtual", not measured): from the unlimited-link run of each method, time(bandwidth, latency)
= wall(unlimited) + max over ranks (bytes / bandwidth + messages * latency). No overlap credit, so it is
an upper bound for ring / DistriFusion; used for the dense curves and the communication-bound regime.

``--shaped`` validates the model against real shaping: each rank in its own network namespace, joined by
veth pairs to a bridge namespace, ``tc tbf`` at the link rate on both ends of every veth (needs root and
iproute2; every namespace is deleted afterwards, also on errors). Shaped wall time is compared with the
sleep-mode time for the same configuration.

Caveat: 2 CPU cores run W processes, so compute does not scale with W here; the meaningful comparisons
are between methods at the same W and link.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..cli.args import Parser, UsageError
from ..comm import link as linkmodel
from .harness import reloaded_after, run_ranks
from .methods import methods_of, parallel_config, selected
from .quality import ledger_of

STEPS = 20
BANDWIDTHS = ("10MB/s", "100MB/s", "inf")  # the virtual extension fills in the rest
LATENCIES = ("100us", "1ms")  # swept at LATENCY_BW (the bandwidth sweep uses latency 0)
LATENCY_BW = "inf"
LATENCY_METHODS = ("patch", "ring", "ring+binary", "diffusers-ring")  # the latency sweep's subset (W=4 only)
SLOW_BW = "1MB/s"  # communication-bound point (uncompressed ring >= 95% communicating): a subset, largest W only
SLOW_METHODS = ("ring", "ring+binary", "ring+auto", "diffusers-ring", "pipefusion", "pipefusion+int4/o2/int8-warmup")
SHAPED_METHODS = ("ring", "ring+binary")


#: Every method the latency bench can sweep (bench/methods.py names). PipeFusion (issue 12): M = W patches; int4
#: order 2 on the boundaries, int8 for the synchronous first step (the best fidelity per byte in bench quality).
METHODS = ("patch", "ring", "ulysses", "distrifusion", "ring+binary", "ring+int2", "ring+lowrank-int4:32",
           "distrifusion+binary", "ring+auto", "pipefusion", "pipefusion+int4/o2/int8-warmup")
QUICK_METHODS = ("patch", "ring", "ring+binary")


def methods(world: int, quick: bool = False) -> list[dict]:
    names = QUICK_METHODS if quick else METHODS + (("usp(2x2)",) if world == 4 else ())
    return methods_of(names)


def _link(bw: str, lat: str, mode: str = "sleep"):
    from ..comm import LinkModel
    return LinkModel(bandwidth=bw, latency=lat, mode=mode)


def _auto_choice(stats: dict) -> dict | None:
    """{codec: layers} from ``cf.stats(pipe)["auto"]`` (None when the method is not auto)."""
    auto = stats.get("auto")
    if not auto:
        return None
    out: dict = {}
    for layer in auto.values():
        out[layer["codec"]] = out.get(layer["codec"], 0) + 1
    return out


def _gen(pipe, steps: int, seed: int = 0):
    import torch
    return pipe(prompt=seed % 10, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


def _bytes_fields(per_rank: list[dict]) -> dict:
    sent = [int(x.get("bytes_sent", 0)) for x in per_rank]
    return {"bytes_per_image": sum(sent) / len(sent), "bytes_max_rank": max(sent),
            "messages_max_rank": max(int(x.get("messages", 0)) for x in per_rank),
            "bytes_uncompressed": sum(int(x.get("bytes_uncompressed", 0)) for x in per_rank) / len(sent),
            "modeled_comm_s": max(float(x.get("modeled_comm_s", 0.0)) for x in per_rank),
            "_per_rank_bytes": sent, "_per_rank_msgs": [int(x.get("messages", 0)) for x in per_rank]}


def latency_worker(rank, world, plan):
    import torch.distributed as dist

    import compactfusion as cf
    from ..bundled.digits import load_digits_pipeline

    pipe = load_digits_pipeline(plan.get("model"))
    pipe.set_progress_bar_config(disable=True)
    steps = plan["steps"]
    rows = []
    # warm-up generation (first-call allocations and lazy initialisation)
    cf.parallelize(pipe, parallel_config(dict(strategy="ring", codec="none")))
    pipe.set_progress_bar_config(disable=True)
    _gen(pipe, 2)
    cf.unparallelize(pipe)

    for bw, lat, subset in plan["links"]:
        reps = plan["reps"] if bw == "inf" else 1  # compute-bound runs are the noisy ones: best of reps
        for m in plan["methods"]:
            if subset is not None and m["name"] not in subset:
                continue
            cfg = parallel_config(m, _link(bw, lat), plan["warmup"])
            cf.parallelize(pipe, cfg)
            pipe.set_progress_bar_config(disable=True)
            try:
                first = None
                if m["codec"] == "auto":  # start-up (link probe, codec timing) is paid once, by the first generation
                    dist.barrier()
                    t0 = time.perf_counter()
                    _gen(pipe, steps)
                    info = [None] * world
                    dist.all_gather_object(info, time.perf_counter() - t0)
                    first = max(info)
                best, per_rank = math.inf, None
                for _ in range(reps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    _gen(pipe, steps)
                    wall = time.perf_counter() - t0
                    info = [None] * world
                    dist.all_gather_object(info, (wall, ledger_of(cf.stats(pipe))))
                    w = max(i[0] for i in info)
                    if w < best:
                        best, per_rank = w, [i[1] for i in info]
                choice = _auto_choice(cf.stats(pipe))  # identical on every rank (auto decides collectively)
            finally:
                cf.unparallelize(pipe)
                pipe = reloaded_after(pipe, m["strategy"], lambda: load_digits_pipeline(plan.get("model")))
            if rank == 0:
                rows.append({"method": m["name"], "strategy": m["strategy"], "codec": m["codec"], "world_size": world,
                             "bandwidth": bw, "latency": lat, "wall_s": best, **_bytes_fields(per_rank)})
                if first is not None:
                    rows[-1].update(first_wall_s=first, auto_choice=choice)
    if plan.get("peers"):
        from .peers import peer_runs

        def run_one(cp_pipe, mode, meter):
            out = []
            for bw, lat, subset in plan["links"]:
                if subset is not None and f"diffusers-{mode}" not in subset:
                    continue
                meter.link = _link(bw, lat)
                reps = plan["reps"] if bw == "inf" else 1
                best, per_rank = math.inf, None
                for _ in range(reps):
                    meter.reset()
                    dist.barrier()
                    t0 = time.perf_counter()
                    _gen(cp_pipe, steps)
                    wall = time.perf_counter() - t0
                    info = [None] * world
                    dist.all_gather_object(info, (wall, meter.summary()))
                    w = max(i[0] for i in info)
                    if w < best:
                        best, per_rank = w, [i[1] for i in info]
                out.append({"method": f"diffusers-{mode}", "strategy": f"diffusers-{mode}", "codec": "none",
                            "world_size": world, "bandwidth": bw, "latency": lat, "wall_s": best,
                            **_bytes_fields(per_rank)})
            return {"rows": out}

        for pr in peer_runs(rank, world, plan, run_one):
            if rank == 0 and "rows" in pr:
                rows += pr["rows"]
    return rows if rank == 0 else None


def single_device_s(model, steps: int, reps: int = 2) -> tuple[float, int]:
    """Best single-process time per image over 1 thread and all cores (oversubscribed OpenMP can be slower)."""
    import torch

    from ..bundled.digits import load_digits_pipeline
    pipe = load_digits_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    best = (math.inf, 1)
    for threads in sorted({1, max(1, os.cpu_count() or 1)}):
        torch.set_num_threads(threads)
        _gen(pipe, 2)
        for _ in range(reps):
            t0 = time.perf_counter()
            _gen(pipe, steps)
            best = min(best, (time.perf_counter() - t0, threads))
    return best


# -- virtual extension -------------------------------------------------------------------------------------
def virtual_time(base_row: dict, bandwidth: float, latency: float) -> float:
    """wall(unlimited) + slowest rank's modelled link time (no overlap credit)."""
    comm = max(linkmodel.link_cost(b, m, bandwidth, latency)
               for b, m in zip(base_row["_per_rank_bytes"], base_row["_per_rank_msgs"]))
    return base_row["wall_s"] + comm


def comm_fraction(row: dict) -> float:
    return min(1.0, row["modeled_comm_s"] / row["wall_s"]) if row["wall_s"] > 0 else 0.0


# -- shaped validation (network namespaces + tc tbf) --------------------------------------------------------
WIRE_OVERHEAD = 1514 / 1448  # frame bytes per TCP payload byte at MTU 1500 with timestamps


class Namespaces:
    """Creates W rank namespaces + a bridge namespace with veth pairs and tbf on both veth ends; always cleans up."""

    def __init__(self, world: int, rate_bytes_per_s: float):
        tag = f"{os.getpid() % 100000}"
        self.world, self.rate = world, rate_bytes_per_s
        self.hub = f"cfb{tag}h"
        self.ns = [f"cfb{tag}r{i}" for i in range(world)]
        self.veth = [(f"cf{tag}v{i}a", f"cf{tag}v{i}b") for i in range(world)]
        self.addr = [f"10.250.{int(tag) % 250}.{i + 1}" for i in range(world)]
        self.created: list[str] = []

    @staticmethod
    def _ip(*args, ns=None):
        cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)

    def __enter__(self):
        try:
            for name in [self.hub] + self.ns:
                self._ip("ip", "netns", "add", name)
                self.created.append(name)
            self._ip("ip", "link", "add", "cfbr0", "type", "bridge", ns=self.hub)
            self._ip("ip", "link", "set", "cfbr0", "up", ns=self.hub)
            # tc counts Ethernet/IP/TCP headers, the link model payload bytes: 1448 payload bytes per 1514-byte frame
            bits = int(self.rate * 8 * WIRE_OVERHEAD)
            burst = max(32 * 1024, int(self.rate / 100))  # 10 ms of traffic (>= 32 KiB)
            for i, (a, b) in enumerate(self.veth):
                self._ip("ip", "link", "add", a, "type", "veth", "peer", "name", b)
                self._ip("ip", "link", "set", a, "netns", self.ns[i])
                self._ip("ip", "link", "set", b, "netns", self.hub)
                self._ip("ip", "link", "set", b, "master", "cfbr0", ns=self.hub)
                self._ip("ip", "link", "set", b, "up", ns=self.hub)
                self._ip("ip", "addr", "add", f"{self.addr[i]}/24", "dev", a, ns=self.ns[i])
                self._ip("ip", "link", "set", a, "up", ns=self.ns[i])
                self._ip("ip", "link", "set", "lo", "up", ns=self.ns[i])
                # no TCP slow-start restart after the idle gaps between layers (a link model has no cwnd)
                self._ip("sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0", ns=self.ns[i])
                for dev, ns in ((a, self.ns[i]), (b, self.hub)):  # rank egress and rank ingress
                    self._ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{bits}bit", "burst",
                             str(burst), "latency", "200ms", ns=ns)
        except BaseException:
            self.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        for name in reversed(self.created):  # deleting a namespace removes its veth ends, bridge and qdiscs
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.created.clear()
        for a, _ in self.veth:  # a veth left in the root namespace by a failure half-way
            subprocess.run(["ip", "link", "del", a], capture_output=True, timeout=30)

    def __exit__(self, *exc):
        self.cleanup()


def shaped_available() -> str | None:
    """None if shaping can run here, else a one-line reason."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for network namespaces and tc"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2 (`{tool}` not found)"
    return None


def _shaped_worker_main() -> None:
    """Entry point of one rank inside its namespace (plan in $CF_SHAPED_PLAN)."""
    import torch
    import torch.distributed as dist

    import compactfusion as cf
    from ..bundled.digits import load_digits_pipeline

    plan = json.loads(os.environ["CF_SHAPED_PLAN"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan["world"]))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pipe = load_digits_pipeline(plan.get("model"))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for m in plan["methods"]:
        # link model in virtual mode: it only accounts; the real shaping does the waiting
        cf.parallelize(pipe, parallel_config(m, _link(plan["bandwidth"], "0", "virtual"), plan["warmup"], 300.0))
        pipe.set_progress_bar_config(disable=True)
        _gen(pipe, 2)  # warm-up (also settles TCP)
        dist.barrier()
        t0 = time.perf_counter()
        _gen(pipe, plan["steps"])
        wall = time.perf_counter() - t0
        info = [None] * world
        dist.all_gather_object(info, (wall, ledger_of(cf.stats(pipe))))
        cf.unparallelize(pipe)
        if rank == 0:
            rows.append({"method": m["name"], "world_size": world, "shaped_wall_s": max(i[0] for i in info),
                         **_bytes_fields([i[1] for i in info])})
    if rank == 0:
        Path(plan["result"]).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def run_shaped(world: int, bandwidth: str, ms: list[dict], steps: int, warmup: int, model, timeout: float) -> list[dict]:
    import tempfile

    rate = _link(bandwidth, "0").bandwidth
    result = Path(tempfile.mkdtemp(prefix="cf-shaped-")) / "rows.json"
    procs = []
    with Namespaces(world, rate) as nss:
        plan = dict(world=world, bandwidth=bandwidth, methods=ms, steps=steps, warmup=warmup, model=model,
                    result=str(result))
        port = 29400 + os.getpid() % 500
        try:
            for i in range(world):
                env = dict(os.environ, RANK=str(i), WORLD_SIZE=str(world), MASTER_ADDR=nss.addr[0],
                           MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=nss.veth[i][0], CF_SHAPED_PLAN=json.dumps(plan),
                           OMP_NUM_THREADS="1")
                cmd = ["ip", "netns", "exec", nss.ns[i], sys.executable, "-c",
                       "from compactfusion.bench.latency import _shaped_worker_main; _shaped_worker_main()"]
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                              start_new_session=True))
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            bad = [(i, p.returncode, p.stderr.read().decode()[-800:]) for i, p in enumerate(procs) if p.returncode]
            if bad:
                raise RuntimeError(f"shaped rank {bad[0][0]} failed (exit {bad[0][1]}): {bad[0][2]}")
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
    return json.loads(result.read_text())


# -- orchestration -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compactfusion bench latency", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-out/latency")
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--bandwidths", default=",".join(BANDWIDTHS), help="sleep-mode sweep (latency 0)")
    p.add_argument("--latencies", default=",".join(LATENCIES), help=f"latency sweep at {LATENCY_BW}, largest world only")
    p.add_argument("--latency-bandwidth", default=LATENCY_BW)
    p.add_argument("--slow-bandwidth", default=SLOW_BW, help="extra communication-bound point for "
                   + ", ".join(SLOW_METHODS) + " ('' to skip)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--reps", type=int, default=2, help="repetitions (best of) on the unlimited link")
    p.add_argument("--methods", default=None, help="comma list of method names (bench/methods.py grammar) to run "
                   "instead of the default set")
    p.add_argument("--model", default=None)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--shaped", action="store_true", help="also validate against tc-shaped veth links")
    p.add_argument("--shaped-bandwidth", default=SLOW_BW)
    p.add_argument("--quick", action="store_true", help="W=2, 2 links, 3 methods, 4 steps")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--overhead", action="store_true",
                   help="only issue 11's bars: ring, ring+binary, ring+int2, ring+auto alternating in one run per world "
                        "(unlimited link, and --slow-bandwidth at the largest world); writes OUT/overhead.{json,csv,md} "
                        "and its section of OUT/results.md")
    p.add_argument("--note", default="", help="a sentence on the conditions of the run, printed with the results")
    return p


def run(a) -> tuple[list[dict], str, list[str]]:
    worlds = [int(w) for w in a.worlds.split(",") if w.strip()]
    bws = [b.strip() for b in a.bandwidths.split(",") if b.strip()]
    lats = [x.strip() for x in a.latencies.split(",") if x.strip()]
    for b in bws + [a.latency_bandwidth]:
        _link(b, "0")
    for x in lats:
        _link("inf", x)
    links = [(b, "0", None) for b in bws] + [(a.latency_bandwidth, x, LATENCY_METHODS) for x in lats]
    big_only = [lk for lk in links if lk[1] != "0"]  # links run at the largest world only (time budget)
    if a.slow_bandwidth:
        _link(a.slow_bandwidth, "0")
        links.insert(0, (a.slow_bandwidth, "0", SLOW_METHODS))
        big_only.append(links[0])
    covered = a.shaped_bandwidth in bws or (a.shaped_bandwidth == a.slow_bandwidth and set(SHAPED_METHODS) <= set(SLOW_METHODS))
    if a.shaped and not covered:  # the sleep-mode counterpart of the shaped runs
        links.append((a.shaped_bandwidth, "0", SHAPED_METHODS))
        big_only.append(links[-1])
    if ("inf", "0", None) not in links:
        links.append(("inf", "0", None))  # the virtual extension needs the unlimited run
    rows: list[dict] = []
    timing = {}
    for w in worlds:
        ms = selected(a.methods, methods(w, a.quick))  # any bench/methods.py name, not only the defaults
        wl = links if w == max(worlds) else [lk for lk in links if lk not in big_only]
        plan = dict(links=wl, methods=ms, steps=a.steps, warmup=a.warmup_steps, reps=a.reps, model=a.model,
                    peers=not a.no_peers)
        t0 = time.perf_counter()
        rows += run_ranks(latency_worker, w, plan, timeout=a.timeout)[0]
        timing[f"world_{w}_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    single, single_threads = single_device_s(a.model, a.steps)
    timing["single_s"] = time.perf_counter() - t0
    for r in rows:
        r["kind"] = "measured (sleep)"
        r["steps"] = a.steps
        r["comm_fraction"] = comm_fraction(r)
        r["speedup_vs_single"] = single / r["wall_s"]
    by = {(r["method"], r["world_size"], r["bandwidth"], r["latency"]): r for r in rows}
    for r in rows:
        ring = by.get(("ring", r["world_size"], r["bandwidth"], r["latency"]))
        if ring:
            r["speedup_vs_ring"] = ring["wall_s"] / r["wall_s"]
            r["byte_bound_vs_ring"] = ring["bytes_max_rank"] / max(1, r["bytes_max_rank"])
        base, ring_base = by.get((r["method"], r["world_size"], "inf", "0")), by.get(("ring", r["world_size"], "inf", "0"))
        if base and ring_base:  # what the measured bytes and the unlimited-link time predict (no overlap credit)
            bw, lat = _link(r["bandwidth"], r["latency"]).bandwidth, _link("inf", r["latency"]).latency
            r["predicted_s"] = virtual_time(base, bw, lat)
            r["predicted_speedup_vs_ring"] = virtual_time(ring_base, bw, lat) / r["predicted_s"]
        dr = by.get(("diffusers-ring", r["world_size"], r["bandwidth"], r["latency"]))
        if dr:
            r["speedup_vs_diffusers_ring"] = dr["wall_s"] / r["wall_s"]
            r["byte_bound_vs_diffusers_ring"] = dr["bytes_max_rank"] / max(1, r["bytes_max_rank"])
    shaped = []
    if a.shaped:
        why = shaped_available()
        if why:
            print(f"bench latency: --shaped skipped: {why}")
        else:
            t0 = time.perf_counter()
            for w in worlds[-1:]:  # the largest world only (time budget)
                sm = [m for m in methods(w) if m["name"] in SHAPED_METHODS]
                for r in run_shaped(w, a.shaped_bandwidth, sm, a.steps, a.warmup_steps, a.model, 600.0):
                    ref = by.get((r["method"], w, a.shaped_bandwidth, "0"))
                    base = by.get((r["method"], w, "inf", "0"))
                    bw = _link(a.shaped_bandwidth, "0").bandwidth
                    r.update(kind="shaped (tc tbf)", bandwidth=a.shaped_bandwidth, latency="0",
                             sleep_wall_s=ref["wall_s"] if ref else None,
                             virtual_s=virtual_time(base, bw, 0.0) if base else None)
                    r["sleep_over_shaped"] = r["sleep_wall_s"] / r["shaped_wall_s"] if r["sleep_wall_s"] else None
                    shaped.append(r)
            timing["shaped_s"] = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = plot_all(rows, single, out)
    md = markdown(rows, shaped, (single, single_threads), timing, a, files)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows + shaped]
    return clean, md, files


VIRTUAL_GRID = [10 ** (e / 4) for e in range(24, 45)]  # 1 MB/s .. 100 GB/s


SPEEDUP_METHODS = ("ring+binary", "ring+int2", "ring+lowrank-int4:32", "distrifusion", "distrifusion+binary", "patch",
                   "ulysses", "diffusers-ring", "diffusers-ulysses")


def plot_all(rows, single, out: Path) -> list[str]:
    """Per world size: time per image, speed-up vs single device, speed-up vs uncompressed ring."""
    from . import plots as P
    files = []
    for w in sorted({r["world_size"] for r in rows}):
        base = {r["method"]: r for r in rows if r["world_size"] == w and r["bandwidth"] == "inf" and r["latency"] == "0"}
        virt = {n: [(bw / 1e6, virtual_time(b, bw, 0.0)) for bw in VIRTUAL_GRID] for n, b in base.items()}
        meas: dict = {}
        for r in rows:
            if r["world_size"] == w and r["latency"] == "0" and r["bandwidth"] != "inf":
                meas.setdefault(r["method"], []).append((_link(r["bandwidth"], "0").bandwidth / 1e6, r["wall_s"]))
        files.append(_pair_plot(P, out / f"latency_w{w}.png", virt, meas, "s / image",
                                f"Wall time per image, W={w}", (single, "single device")))
        inv = lambda d: {n: [(x, single / y) for x, y in pts] for n, pts in d.items()}  # noqa: E731
        files.append(_pair_plot(P, out / f"speedup_single_w{w}.png", inv(virt), inv(meas), "speed-up vs single device",
                                f"Speed-up vs single device (this 2-core CPU), W={w}", (1.0, "single device")))
        if "ring" in base:
            ring_v, ring_m = dict(virt["ring"]), dict(meas.get("ring", []))
            sv = {n: [(x, ring_v[x] / y) for x, y in virt[n]] for n in SPEEDUP_METHODS if n in virt}
            sm = {n: [(x, ring_m[x] / y) for x, y in meas.get(n, []) if x in ring_m] for n in SPEEDUP_METHODS}
            files.append(_pair_plot(P, out / f"speedup_w{w}.png", sv, sm, "speed-up over uncompressed ring",
                                    f"Speed-up vs uncompressed ring, W={w}", (1.0, "ring")))
    return files


def _pair_plot(P, path, virtual: dict, measured: dict, ylabel: str, title: str, hline=None):
    """Lines: virtual extension; dots: sleep-mode measurements (same colour per method)."""
    plt = P._plt()
    fig, ax = plt.subplots(figsize=(8.5, 5))
    colors = {}
    for name, pts in virtual.items():
        line, = ax.plot(*zip(*pts), lw=1.2, alpha=0.7, label=name)
        colors[name] = line.get_color()
    for name, pts in measured.items():
        if pts:
            ax.plot(*zip(*sorted(pts)), "o", ms=5, color=colors.get(name), mec="k", mew=0.4)
    if hline:
        ax.axhline(hline[0], color="k", ls="--", lw=1, label=hline[1])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link bandwidth per rank (MB/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n(dots: measured, sleep mode; lines: virtual extension from the unlimited-link run)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return P._save(fig, path)


def verdict(ok) -> str:
    return "yes" if ok else ("n/a (not communication-bound)" if ok is None else "**no**")


def headline(rows, w: int) -> list[dict]:
    """Communication-bound and unlimited-link claims at world size w."""
    out = []
    rows = [r for r in rows if r.get("kind", "measured (sleep)") == "measured (sleep)"]
    by = {(r["method"], r["bandwidth"], r["latency"]): r for r in rows if r["world_size"] == w}
    rings = [r for r in rows if r["world_size"] == w and r["method"] == "ring" and r["latency"] == "0"
             and r["bandwidth"] != "inf"]
    bound = [r for r in rings if r["comm_fraction"] >= 0.95]
    # the least favourable link that is communication-bound, else the most communication-bound one measured
    ring = max(bound, key=lambda r: _link(r["bandwidth"], "0").bandwidth) if bound else \
        max(rings, key=lambda r: r["comm_fraction"], default=None)
    if ring:
        where = f"W={w}, {ring['bandwidth']} (uncompressed ring {100 * ring['comm_fraction']:.0f}% communicating)"
        b = by.get(("ring+binary", ring["bandwidth"], "0"))
        d = by.get(("diffusers-ring", ring["bandwidth"], "0"))
        regime = ring["comm_fraction"] >= 0.95
        if b:
            out.append({"claim": f"{where}: ring+binary >= 6.5x faster than uncompressed ring",
                        "ok": (b["speedup_vs_ring"] >= 6.5) if regime else None,  # None: regime not reached
                        "value": f"{b['speedup_vs_ring']:.2f}x (byte bound {b['byte_bound_vs_ring']:.1f}x, model from "
                                 f"bytes + unlimited-link compute {b.get('predicted_speedup_vs_ring', float('nan')):.2f}x)"})
        if b and d:
            out.append({"claim": f"{where}: ring+binary >= 5x faster than diffusers native ring CP",
                        "ok": (b["speedup_vs_diffusers_ring"] >= 5.0) if regime else None,
                        "value": f"{b['speedup_vs_diffusers_ring']:.2f}x (byte bound "
                                 f"{b['byte_bound_vs_diffusers_ring']:.1f}x)"})
    pf_rows = [r for r in rows if r["world_size"] == w and r["method"] == "pipefusion" and r["latency"] == "0"
               and r["bandwidth"] != "inf"]
    pf = min(pf_rows, key=lambda r: _link(r["bandwidth"], "0").bandwidth, default=None)  # the slowest link measured
    if pf:
        for name in ("pipefusion+int4/o2/int8-warmup",):
            c = by.get((name, pf["bandwidth"], "0"))
            if c:  # the bar is for the communication-bound point (the slow link); elsewhere it is reported only
                bound = pf["bandwidth"] == SLOW_BW
                out.append({"claim": f"W={w}, {pf['bandwidth']}: {name} >= 3x faster than uncompressed PipeFusion",
                            "ok": (pf["wall_s"] >= 3.0 * c["wall_s"]) if bound else None,
                            "value": f"{pf['wall_s'] / c['wall_s']:.2f}x ({c['wall_s']:.2f} s vs {pf['wall_s']:.2f} s; "
                                     f"byte bound {pf['bytes_max_rank'] / max(1, c['bytes_max_rank']):.1f}x)"})
    ring_u, bin_u = by.get(("ring", "inf", "0")), by.get(("ring+binary", "inf", "0"))
    if ring_u and bin_u:
        out.append({"claim": f"W={w}, unlimited link: ring+binary costs <= 10% more than uncompressed ring",
                    "ok": bin_u["wall_s"] <= 1.10 * ring_u["wall_s"],
                    "value": f"{bin_u['wall_s']:.2f} s vs {ring_u['wall_s']:.2f} s "
                             f"({100 * (bin_u['wall_s'] / ring_u['wall_s'] - 1):+.0f}%)"})
    return out


def markdown(rows, shaped, single_info, timing, a, files) -> str:
    from .plots import fmt_bytes, md_table
    single, threads = single_info
    lines = ["## Latency vs link on the bundled digits model (`bench latency`)", "",
             f"One image (seed 0), {a.steps} denoising steps, fp32 on CPU; ranks are gloo processes on a "
             f"{os.cpu_count()}-core machine, so compute does not speed up with W here (single device, best of 1 and "
             f"{os.cpu_count()} threads: {single:.2f} s/image with {threads}). Link model in **sleep mode** (each op padded up to "
             "latency + bytes/bandwidth per message, one outbound link per rank). Speed-ups next to the **byte bound** "
             "(ratio of the slowest rank's bytes: the limit when communication dominates).", ""]
    for w in sorted({r["world_size"] for r in rows}):
        sel = [r for r in rows if r["world_size"] == w and r["latency"] == "0"]
        bws = list(dict.fromkeys(r["bandwidth"] for r in sel))
        names = list(dict.fromkeys(r["method"] for r in sel))
        by = {(r["method"], r["bandwidth"]): r for r in sel}
        body = []
        for n in names:
            r0 = next(r for r in sel if r["method"] == n)
            cells = [n, fmt_bytes(r0["bytes_max_rank"])]
            for bw in bws:
                r = by.get((n, bw))
                cell = "-" if r is None else f"{r['wall_s']:.2f}"
                if r is not None and "speedup_vs_ring" in r and n != "ring":
                    bound = r["byte_bound_vs_ring"]
                    cell += f" ({r['speedup_vs_ring']:.1f}x" + (f"; bound {bound:.1f}x)" if abs(bound - 1) > 0.05 else ")")
                cells.append(cell)
            body.append(cells)
        lines += [f"### W={w}: seconds per image (speed-up vs uncompressed ring; byte bound = ring's bytes / the "
                  "method's bytes, the speed-up limit when communication dominates)", "",
                  md_table(["method", "bytes/image (slowest rank)"] + bws, body), ""]
        comm = [[bw, f"{100 * by[('ring', bw)]['comm_fraction']:.0f}%"] for bw in bws if ("ring", bw) in by]
        if comm:
            lines += ["Share of the uncompressed ring's time spent in modelled communication: "
                      + ", ".join(f"{b}: {c}" for b, c in comm) + ".", ""]
        lat = [r for r in rows if r["world_size"] == w and r["latency"] != "0"]
        if lat:
            lbw = lat[0]["bandwidth"]
            lat += [r for r in sel if r["bandwidth"] == lbw]  # latency 0 at the same bandwidth
            lb = sorted(dict.fromkeys(r["latency"] for r in lat), key=lambda x: _link("inf", x).latency)
            byl = {(r["method"], r["latency"]): r for r in lat}
            names_l = [n for n in dict.fromkeys(r["method"] for r in lat) if n in LATENCY_METHODS]
            msgs = {n: byl[(n, "0")]["messages_max_rank"] for n in names_l if (n, "0") in byl}
            lines += [f"Latency sweep at bandwidth {lbw} (seconds per image; messages per image on the slowest rank "
                      "in brackets):", "",
                      md_table(["method"] + [f"latency {l}" for l in lb],
                               [[f"{n} ({msgs.get(n, '?')})"] + [f"{byl[(n, l)]['wall_s']:.2f}" if (n, l) in byl else "-"
                                                                for l in lb] for n in names_l]), ""]
        # speed-ups with bounds in the communication-bound regime, from the virtual extension
        base = {r["method"]: r for r in sel if r["bandwidth"] == "inf"}
        if "ring" in base:
            vb = [1e6, 3e6, 10e6, 100e6, 1e9]
            body = []
            for n, r in base.items():
                body.append([n] + [f"{virtual_time(base['ring'], bw, 0) / virtual_time(r, bw, 0):.2f}x" for bw in vb]
                            + [f"{base['ring']['bytes_max_rank'] / max(1, r['bytes_max_rank']):.1f}x"])
            lines += [f"Virtual extension (not measured: unlimited-link wall + modelled link time, no overlap credit), "
                      f"W={w}, speed-up over uncompressed ring:", "",
                      md_table(["method"] + [f"{bw / 1e6:g} MB/s" for bw in vb] + ["byte bound"], body), ""]
        cl = headline(rows, w)
        lines += [md_table(["claim", "holds", "measured"], [[c["claim"], verdict(c["ok"]), c["value"]] for c in cl]), ""]
    if shaped:
        body = [[r["method"], r["world_size"], r["bandwidth"], f"{r['shaped_wall_s']:.2f}",
                 "-" if r["sleep_wall_s"] is None else f"{r['sleep_wall_s']:.2f}",
                 "-" if r["virtual_s"] is None else f"{r['virtual_s']:.2f}",
                 "-" if r["sleep_over_shaped"] is None else f"{r['sleep_over_shaped']:.2f}"] for r in shaped]
        ok = all(r["sleep_over_shaped"] is not None and abs(r["sleep_over_shaped"] - 1) <= 0.15 for r in shaped)
        lines += ["### Link model vs real shaping (`--shaped`)", "",
                  "Each rank in its own network namespace, veth pairs to a bridge namespace, `tc tbf` on both ends of "
                  "every veth at the rate x 1514/1448 (tc counts frame bytes, the link model payload bytes; bucket "
                  "10 ms of traffic, >= 32 KiB); compactfusion's link model only accounts (virtual) there. Modelled = the "
                  "sleep-mode run at the same rate on loopback.", "",
                  md_table(["method", "W", "rate", "shaped s", "modelled (sleep) s", "virtual s", "modelled/shaped"], body),
                  "", f"Agreement within 15%: {'yes' if ok else '**no**'}.", ""]
    lines += ["Timings of this bench: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()) + ".", ""]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in files]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.worlds, a.bandwidths, a.latencies, a.steps, a.reps = "2", "10MB/s,inf", "", min(a.steps, 4), 1
        a.slow_bandwidth = ""
    try:
        worlds = [int(w) for w in a.worlds.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--worlds must be a comma list of integers, got {a.worlds!r}") from None
    if not worlds or any(w < 2 for w in worlds):
        raise UsageError("--worlds must list sizes >= 2")
    if a.steps < 1 or a.reps < 1 or not 0 <= a.warmup_steps < a.steps:
        raise UsageError("--steps and --reps must be >= 1 and --warmup-steps in [0, --steps)")
    if a.overhead:
        return _main_overhead(a, worlds)
    rows, md, files = run(a)
    from ._common import write_outputs
    from .latency_overhead import kept_block
    write_outputs(Path(a.out), rows, md + kept_block(Path(a.out)))
    print(f"bench latency: {len(rows)} rows -> {a.out}/results.{{json,csv,md}}")
    for w in worlds:
        for c in headline(rows, w):
            print(f"  [{ {True: 'ok', False: 'NO', None: 'n/a'}[c['ok']] }] {c['claim']}: {c['value']}")
    return 0


def _main_overhead(a, worlds: list[int]) -> int:
    import platform

    import torch

    from ._common import environment_record, json_safe, rows_to_csv
    from .latency_overhead import claims, markdown, run_overhead, splice
    env = environment_record()
    load0 = os.getloadavg()[0]
    rows, timing = run_overhead(a, worlds)
    note = (f"Machine: {env['cores']}-core {env['cpu']} ({platform.machine()}), torch {torch.__version__}, diffusers "
            f"{env['diffusers']}, {env['date_utc'][:16].replace('T', ' ')} UTC; 1-min load average {load0:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end." + (f" {a.note.strip()}" if a.note.strip() else ""))
    md = markdown(rows, timing, a, note)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    clean = [json_safe(r) for r in rows]
    (out / "overhead.json").write_text(json.dumps(clean, indent=1) + "\n")
    (out / "overhead.csv").write_text(rows_to_csv(clean))
    (out / "overhead.md").write_text(md)
    splice(out / "results.md", md)
    print(f"bench latency --overhead: {len(rows)} rows -> {out}/overhead.{{json,csv,md}} (and its section of results.md)")
    for c in claims(rows):
        print(f"  [{'ok' if c['ok'] else 'NO'}] {c['claim']}: {c['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
