"""``compactfusion bench serve``: a bounded loopback load generator against ``compactfusion serve``.

    compactfusion bench serve [--nproc 2] [--requests 16] [--concurrency 1,4] [--time-limit 120] [--steps 8]

Starts local servers on the bundled digits model (one without batching, one with ``--max-batch``), and for
each codec (``none``, ``binary``: chosen per request) and concurrency level sends a fixed number of
requests from that many concurrent httpx clients, stopping early at ``--time-limit``. Rows: throughput
(answered requests per second), latency p50/p95/p99, mean queue time and batch size (from each response's
``usage``), bytes sent per image, errors. Then a fault run (skip with ``--no-fault``): load at the highest
concurrency, SIGKILL of rank 1 after a few answers; every request is counted as answered (200), failed
with a clear error (an HTTP error status), refused (connection refused: never accepted) or lost
(accepted, then no response): the goal is 0 lost. Writes results.json/.csv/.md and serve.png to ``--out``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..cli.args import Parser, UsageError

START_TIMEOUT_S = 600


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compactfusion bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--requests", type=int, default=16, help="requests per (server, codec, concurrency) cell")
    p.add_argument("--concurrency", default="1,4", help="comma list of concurrent clients")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per cell before it stops sending")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=8, help="images per call on the batching server")
    p.add_argument("--codecs", default="none,binary")
    p.add_argument("--no-fault", action="store_true", help="skip the worker-kill run")
    p.add_argument("--out", default="bench-out/serve")
    p.add_argument("--quiet", action="store_true")
    return p


class LocalServer:
    def __init__(self, nproc: int, flags: list[str]):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.proc = subprocess.Popen([sys.executable, "-m", "compactfusion.cli.main", "serve", "--nproc", str(nproc),
                                      "--port", "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.url, self.ready, self.err = None, threading.Event(), []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if "listening on " in line:
                self.url = line.split("listening on ")[1].strip()
            if "ready" in line:
                self.ready.set()

    def wait_ready(self) -> "LocalServer":
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {''.join(self.err)[-500:]}")
        return self

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 4)


async def _load(url: str, bodies: list[dict], concurrency: int, time_limit: float, on_answer=None) -> dict:
    """Send ``bodies`` with ``concurrency`` workers; outcome counts and per-request records."""
    import httpx
    queue = list(reversed(bodies))
    records, counts = [], {"answered": 0, "failed": 0, "refused": 0, "lost": 0}
    start = time.monotonic()

    async def worker(client):
        while queue and time.monotonic() - start < time_limit:
            body = queue.pop()
            t0 = time.monotonic()
            try:
                r = await client.post(url + "/v1/images/generations", json=body)
            except httpx.ConnectError:
                counts["refused"] += 1  # never accepted: the server is gone
                continue
            except (httpx.TransportError, httpx.TimeoutException):
                counts["lost"] += 1  # accepted (or sent), then no answer
                continue
            if r.status_code == 200:
                counts["answered"] += 1
                records.append(dict(latency_s=time.monotonic() - t0, **r.json()["usage"], images=len(r.json()["data"])))
                if on_answer is not None:
                    on_answer(counts["answered"])
            else:
                counts["failed"] += 1
                counts.setdefault(f"http_{r.status_code}", 0)
                counts[f"http_{r.status_code}"] += 1

    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit + 60)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return dict(counts, elapsed_s=time.monotonic() - start, records=records)


def _row(server: str, codec: str, concurrency: int, res: dict) -> dict:
    rec = res["records"]
    lat = [r["latency_s"] for r in rec]
    images = sum(r["images"] for r in rec)
    return {"kind": "load", "server": server, "codec": codec, "concurrency": concurrency,
            "answered": res["answered"], "errors": res["failed"] + res["lost"],
            "throughput_rps": round(res["answered"] / res["elapsed_s"], 3) if res["elapsed_s"] else 0.0,
            "p50_s": _pct(lat, 0.5), "p95_s": _pct(lat, 0.95), "p99_s": _pct(lat, 0.99),
            "mean_queue_s": round(sum(r["queue_time_s"] for r in rec) / len(rec), 4) if rec else None,
            "mean_batch": round(sum(r["batch_requests"] for r in rec) / len(rec), 2) if rec else None,
            "bytes_per_image": int(sum(r["bytes_sent"] for r in rec) / images) if images else None,
            "compression_ratio": rec[0]["compression_ratio"] if rec else None}


def _bodies(n: int, codec: str, steps: int, offset: int = 0) -> list[dict]:
    return [{"prompt": str((offset + i) % 10), "seed": offset + i, "num_inference_steps": steps, "codec": codec}
            for i in range(n)]


def run_fault(a, concurrency: int) -> dict:
    """Kill rank 1 under load; count what every request got."""
    import httpx
    s = LocalServer(a.nproc, ["--codec", "binary", "--allow-codecs", "binary,none", "--timeout", "10",
                              "--heartbeat", "1", "--default-steps", str(a.steps)]).wait_ready()
    ranks = httpx.get(s.url + "/health").json()["ranks"]
    killed = {}

    def on_answer(n):
        if n == 3 and not killed:
            killed["t"] = time.monotonic()
            os.kill(ranks[1]["pid"], signal.SIGKILL)

    exited = {}
    threading.Thread(target=lambda: exited.setdefault("t", (s.proc.wait(), time.monotonic())[1]), daemon=True).start()
    bodies = _bodies(4 * a.requests, "binary", a.steps)
    res = asyncio.run(_load(s.url, bodies, concurrency, a.time_limit, on_answer))
    code = s.proc.wait(60)
    time.sleep(0.3)
    exit_s = round(exited["t"] - killed["t"], 2) if "t" in exited and killed else None
    return {"kind": "fault", "server": "kill rank 1", "codec": "binary", "concurrency": concurrency,
            "sent": res["answered"] + res["failed"] + res["lost"] + res["refused"], "answered": res["answered"],
            "failed_clearly": res["failed"], "refused": res["refused"], "lost": res["lost"],
            "http_500": res.get("http_500", 0), "http_503": res.get("http_503", 0), "server_exit_code": code,
            "exit_after_kill_s": exit_s}


def main(argv=None) -> int:
    from ._common import environment_markdown, write_outputs
    from .plots import md_table

    a = build_parser().parse_args(argv)
    try:
        levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--concurrency must be a comma list of integers, got {a.concurrency!r}") from None
    if not levels or min(levels) < 1 or a.requests < 1 or a.nproc < 2 or a.steps < 2 or a.time_limit <= 0:
        raise UsageError("need --concurrency >= 1, --requests >= 1, --nproc >= 2, --steps >= 2, --time-limit > 0")
    codecs = [c.strip() for c in a.codecs.split(",") if c.strip()]
    rows = []
    for name, extra in (("no batching", ["--max-batch", "1"]),
                        (f"batching (max {a.max_batch})", ["--max-batch", str(a.max_batch), "--batch-wait-ms", "20"])):
        s = LocalServer(a.nproc, ["--codec", codecs[0], "--allow-codecs", ",".join(codecs), "--max-queue", "256",
                                  "--default-steps", str(a.steps), *extra]).wait_ready()
        try:
            for codec in codecs:
                asyncio.run(_load(s.url, _bodies(1, codec, a.steps), 1, a.time_limit))  # warm the codec switch
                for c in levels:
                    res = asyncio.run(_load(s.url, _bodies(a.requests, codec, a.steps, 100 * c), c, a.time_limit))
                    rows.append(_row(name, codec, c, res))
                    if not a.quiet:
                        print({k: v for k, v in rows[-1].items() if k != "kind"}, flush=True)
        finally:
            s.stop()
    if not a.no_fault:
        rows.append(run_fault(a, max(levels)))
        if not a.quiet:
            print(rows[-1], flush=True)
    out = Path(a.out)
    md = _markdown(a, rows, md_table)
    plot = _plot(out, rows)
    write_outputs(out, rows, md + (f"\n![serve]({Path(plot).name})\n" if plot else "") + "\n" + environment_markdown())
    if not a.quiet:
        print(md)
    fault = [r for r in rows if r["kind"] == "fault"]
    return 1 if any(r["lost"] for r in fault) else 0


def _markdown(a, rows, md_table) -> str:
    load = [r for r in rows if r["kind"] == "load"]
    head = ["server", "codec", "clients", "answered", "errors", "req/s", "p50 s", "p95 s", "p99 s", "queue s",
            "batch", "bytes/image", "ratio"]
    md = [f"#### Serve: {a.nproc} ranks, bundled digits, {a.steps} steps, {a.requests} requests per cell "
          f"(`compactfusion bench serve`)", "",
          md_table(head, [[r["server"], r["codec"], r["concurrency"], r["answered"], r["errors"], r["throughput_rps"],
                           r["p50_s"], r["p95_s"], r["p99_s"], r["mean_queue_s"], r["mean_batch"],
                           r["bytes_per_image"], r["compression_ratio"]] for r in load])]
    for r in (r for r in rows if r["kind"] == "fault"):
        md += ["", f"Fault run (rank 1 killed after 3 answers, {r['concurrency']} clients): {r['sent']} requests sent, "
               f"{r['answered']} answered, {r['failed_clearly']} failed with an error status (500: {r['http_500']}, "
               f"503: {r['http_503']}), {r['refused']} refused after the server exited, **{r['lost']} lost**; "
               f"server exit code {r['server_exit_code']}, {r['exit_after_kill_s']} s after the kill."]
    return "\n".join(md) + "\n"


def _plot(out: Path, rows) -> str | None:
    try:
        from .plots import lines
    except ImportError:
        return None
    load = [r for r in rows if r["kind"] == "load"]
    series = {}
    for r in load:
        series.setdefault(f"{r['server']}, {r['codec']}", []).append((r["concurrency"], r["throughput_rps"]))
    out.mkdir(parents=True, exist_ok=True)
    try:
        return lines(out / "serve.png", series, "concurrent clients", "requests / s", "serve throughput")
    except Exception:  # noqa: BLE001 - no matplotlib backend: the table is the result
        return None
