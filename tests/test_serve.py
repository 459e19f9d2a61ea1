"""`compactfusion serve` on 2 gloo ranks with the bundled digits model, end to end over HTTP.

Two servers in all (each start costs ~10 s of imports and loading on 2 cores): one shared by the
lifecycle/API checks and ended by the SIGTERM drain check, one killed by the worker-death check. The
`generate` run the images are compared with starts while the first server loads.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

pytestmark = pytest.mark.dist

EXE = [sys.executable, "-m", "compactfusion.cli.main"]
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEPS = 4
START_TIMEOUT_S = 420


class Server:
    """A `compactfusion serve --nproc 2` subprocess; ``url`` once it printed its address."""

    def __init__(self, *flags: str):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(EXE + ["serve", "--nproc", "2", "--port", "0", "--default-steps", str(STEPS),
                                            *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on " in line:
                self.url = line.split("listening on ")[1].strip()
            if "ready" in line:
                self.ready.set()

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.wait(0.2):
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {''.join(self.err)[-2000:]}"
            assert time.monotonic() < deadline, "server did not become ready"
        return self

    def post(self, body: dict, headers=AUTH, timeout=120):
        return httpx.post(self.url + "/v1/images/generations", json=body, headers=headers, timeout=timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def decode(resp) -> list[np.ndarray]:
    from PIL import Image
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in resp.json()["data"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, generate's image): a server with auth, compression, batching and a small queue."""
    out = tmp_path_factory.mktemp("gen")
    gen = subprocess.Popen(EXE + ["generate", "--nproc", "2", "--codec", "binary", "--steps", str(STEPS), "--prompt",
                                  "3", "--seed", "5", "--quiet", "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    s = Server("--codec", "binary", "--allow-codecs", "binary,none", "--api-key", KEY, "--max-batch", "4",
               "--batch-wait-ms", "400", "--max-queue", "3", "--max-n", "2", "--timeout", "30", "--heartbeat", "1")
    try:
        _, err = gen.communicate(timeout=START_TIMEOUT_S)
        assert gen.returncode == 0, err[-2000:]
        from PIL import Image
        reference = np.asarray(Image.open(out / "image_0.png"))
        yield s.wait_ready(), reference
    finally:
        s.stop()
        if gen.poll() is None:
            gen.kill()


def test_health_models_auth_and_validation(served):
    s, _ = served
    h = httpx.get(s.url + "/health").json()
    assert h["status"] == "ready" and h["world_size"] == 2 and [r["rank"] for r in h["ranks"]] == [0, 1]
    models = httpx.get(s.url + "/v1/models", headers=AUTH).json()["data"][0]
    assert models["codecs"] == ["binary", "none"] and models["default_size"] == "32x32"
    assert httpx.get(s.url + "/v1/models").status_code == 401
    assert s.post({"prompt": "3"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    for body, param in (({"prompt": "3", "n": 3}, "n"), ({"prompt": "3", "size": "33x32"}, "size"),
                        ({"prompt": "3", "size": "big"}, "size"), ({"prompt": "3", "codec": "int8"}, "codec"),
                        ({"prompt": "seven"}, "prompt"), ({"prompt": "3", "num_inference_steps": 0}, "num_inference_steps"),
                        ({"prompt": "3", "response_format": "url"}, "response_format"), ({"n": 1}, "prompt"),
                        ({"prompt": "3", "negative_prompt": "4"}, "negative_prompt")):
        r = s.post(body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_generate_matches_cli_and_reports_usage(served):
    s, reference = served
    r = s.post({"prompt": "3", "seed": 5, "num_inference_steps": STEPS, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    (img,) = decode(r)
    assert img.shape == reference.shape and np.array_equal(img, reference)  # identical to `compactfusion generate`
    u = r.json()["usage"]
    assert u["codec"] == "binary" and 0 < u["bytes_sent"] < u["bytes_uncompressed"] and u["compression_ratio"] > 1
    assert u["wall_time_s"] > 0 and u["queue_time_s"] >= 0 and u["world_size"] == 2
    r = s.post({"prompt": "3", "seed": 5, "codec": "none", "n": 2})  # a per-request codec switch and back
    assert r.status_code == 200 and r.json()["usage"]["compression_ratio"] == 1.0 and len(r.json()["data"]) == 2
    metrics = httpx.get(s.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values['compactfusion_requests_total{outcome="completed"}'] >= 2
    assert values["compactfusion_bytes_sent_total"] > 0
    assert values["compactfusion_bytes_uncompressed_total"] > values["compactfusion_bytes_sent_total"]
    assert values["compactfusion_request_latency_seconds_count"] >= 2 and "compactfusion_queue_depth" in values
    assert "compactfusion_in_flight" in values and "compactfusion_modeled_link_seconds_total" in values


@pytest.mark.parametrize("codec", ["binary", "none"])
def test_batched_equals_unbatched(served, codec):
    s, _ = served
    bodies = [{"prompt": "1", "seed": 11, "codec": codec}, {"prompt": "8", "seed": 12, "n": 2, "codec": codec},
              {"prompt": "4", "seed": 13, "codec": codec}]
    with ThreadPoolExecutor(3) as pool:
        batched = list(pool.map(s.post, bodies))
    assert all(r.status_code == 200 for r in batched), [r.text for r in batched]
    assert max(r.json()["usage"]["batch_requests"] for r in batched) > 1  # they did share a pipeline call
    for body, rb in zip(bodies, batched):
        alone = s.post(body)
        assert alone.json()["usage"]["batch_requests"] == 1
        for a, b in zip(decode(alone), decode(rb)):
            # 8-bit PNG levels: floats equal within 1e-4 (checked at the engine level below) round to the same
            # level, or to the next one where a value sits on a rounding boundary
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1 and (a != b).mean() < 0.1


def test_queue_full_is_429_with_retry_after(served):
    s, _ = served
    bodies = [{"prompt": str(i % 10), "seed": i, "num_inference_steps": STEPS + 1 + i % 3} for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        rs = list(pool.map(s.post, bodies))
    codes = sorted(r.status_code for r in rs)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in rs if r.status_code == 429)
    assert s.post({"prompt": "2"}).status_code == 200  # the server carries on


def test_sigterm_drains(served):
    """In-flight finishes, queued ones get 503, then exit 0 (runs last on the shared server)."""
    s, _ = served
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(s.post, {"prompt": "5", "num_inference_steps": 40})
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health").json()["in_flight"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        queued = [pool.submit(s.post, {"prompt": "6", "num_inference_steps": 3 + i}) for i in range(2)]
        while httpx.get(s.url + "/health").json()["queue_depth"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        assert first.result().status_code == 200
        assert [q.result().status_code for q in queued] == [503, 503]
    assert s.proc.wait(60) == 0, "".join(s.err)[-2000:]


def test_worker_death_fails_inflight_and_exits_nonzero():
    s = Server("--timeout", "10", "--heartbeat", "1").wait_ready()
    try:
        ranks = httpx.get(s.url + "/health").json()["ranks"]
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(s.post, {"prompt": "9", "num_inference_steps": 100})
            deadline = time.monotonic() + 30
            while httpx.get(s.url + "/health").json()["in_flight"] == 0:
                assert time.monotonic() < deadline and not pending.done(), pending.result().text
                time.sleep(0.05)
            killed = time.monotonic()
            os.kill(ranks[1]["pid"], signal.SIGKILL)
            r = pending.result()
            answered = time.monotonic() - killed
        assert answered < 10 + 8, answered  # within the collective timeout (+ slack for a loaded machine)
        assert r.status_code == 500 and "rank 1" in r.json()["error"]["message"], r.text
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and "rank 1" in h.json()["reason"]
        assert s.post({"prompt": "1"}).status_code == 503
        code = s.proc.wait(30)
        assert code != 0 and time.monotonic() - killed < 10 + 15
        for r in ranks:  # no orphan rank
            assert not Path(f"/proc/{r['pid']}").exists() or "zombie" in Path(f"/proc/{r['pid']}/status").read_text()
    finally:
        s.stop()


def _job(i, steps=4, n=1):
    from compactfusion.serve.schemas import Job
    return Job(id=str(i), prompt="1", n=n, width=32, height=32, steps=steps, seed=i, guidance_scale=None,
               negative_prompt=None, codec="none")


def test_scheduler_fifo_batching_queue_full_and_close():
    from compactfusion.serve.scheduler import NotAccepting, QueueFull, Scheduler
    s = Scheduler(max_queue=4, max_batch_images=3)
    for i, (steps, n) in enumerate([(4, 1), (5, 1), (4, 2), (4, 1)]):
        s.submit(_job(i, steps, n))
    with pytest.raises(QueueFull) as e:
        s.submit(_job(9))
    assert e.value.retry_after_s >= 1
    assert [x.job.id for x in s.next_batch(0.1)] == ["0", "2"]  # oldest first; compatible ones up to 3 images
    s.finished(0.5)
    assert [x.job.id for x in s.next_batch(0.1)] == ["1"]  # different steps: its own call
    assert s.next_batch(0.1)[0].job.id == "3" and s.next_batch(0.05) == []
    s.submit(_job(5))
    assert [x.job.id for x in s.close("shutting down")] == ["5"]
    with pytest.raises(NotAccepting):
        s.submit(_job(6))


def _engine_batches(rank, world):
    """Each request's float images from one batched call vs alone, compressed and uncompressed."""
    import torch
    from compactfusion.cli.serve import build_parser
    from compactfusion.serve.engine import Engine
    out = {}
    # ring (binary, none) and pipefusion (int4 boundaries over stale steps, none): one group for both
    for flags, codecs, steps in ((["--codec", "binary"], ("binary", "none"), 3),
                                 (["--strategy", "pipefusion", "--codec", "int4"], ("int4", "none"), 4)):
        engine = Engine(build_parser().parse_args(flags), world, torch.device("cpu"), torch.float32)
        jobs = [dict(prompt=p, n=n, width=32, height=32, steps=steps, seed=s, guidance_scale=None, negative_prompt=None)
                for p, n, s in (("1", 1, 11), ("8", 2, 12), ("4", 1, 13))]
        for codec in codecs:
            js = [dict(j, codec=codec) for j in jobs]
            batched, stats_b = engine.run(js)
            alone = [engine.run([j])[0][0] for j in js]
            out[f"{flags[1]}:{codec}"] = (max(float(abs(b - x).max()) for b, x in zip(batched, alone)),
                                          stats_b["bytes_sent"], [x.shape[0] for x in batched])
    return out


def test_engine_batched_equals_unbatched_within_1e4():
    from distributed import run_distributed
    res = run_distributed(_engine_batches, 2, timeout=300)[0]
    assert len(res) == 4, list(res)
    for codec, (diff, sent, sizes) in res.items():
        assert sizes == [1, 2, 1] and sent > 0
        # pipefusion + int4: each request has its own boundary streams (test_pipefusion checks <= 1e-4 on tiny
        # FLUX), but the digits model's matmuls round differently at batch 4 and 8, and int4 bins of 4 steps of
        # stale patches amplify that ~1e-6 to a few 1e-3 (coded together instead: ~0.1)
        assert diff <= (0.03 if codec == "pipefusion:int4" else 1e-4), (codec, diff)
