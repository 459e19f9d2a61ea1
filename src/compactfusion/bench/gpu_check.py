"""``make gpu-check``: everything that needs CUDA, in one run of at most ~5 minutes on one GPU, as one JSON report.

    python -m compactfusion.bench.gpu_check --out gpu_check.json      # on a GPU machine
    python -m compactfusion.bench.gpu_check --cpu-smoke               # tiny shapes on the CPU (tested in CI)

Sections (each ``{"status": "ok" | "failed" | "skipped", ...}``; the exit code is 1 if any failed):

* ``cuda_tests``  - pytest of the CUDA tests (tests/test_parallel_cuda.py, tests/test_fused*.py);
* ``kernels``     - fused ``binary``/``int2`` codecs vs the PyTorch reference: identical payload bytes and
  bitwise-equal reconstruction, and encode+decode throughput at FLUX per-rank shapes (1088x3072,
  4096x3072) next to ``clone()`` and the device copy bandwidth;
* ``pipeline``    - a FLUX-shaped random-init ``FluxTransformer2DModel`` (2 double + 2 single blocks,
  4096 image + 512 text tokens, bf16) parallelized at world size 1 with compression on, vs. the plain
  model, with the number of host syncs seen by CUDA's sync-debug mode;
* ``two_ranks``   - 2 processes on the one device over gloo (CUDA payloads staged through the CPU):
  Communicator ops on device tensors and ring/ulysses attention with compression vs. the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[3]
SMOKE = {"kernel_shapes": [(64, 128)], "copy_mb": 4, "flux": dict(heads=2, head_dim=16, joint=32, pooled=32,
         in_ch=4, rope=(4, 6, 6), tokens=64, text=8), "seq": 32, "heads": 2, "dim": 16}
FULL = {"kernel_shapes": [(1088, 3072), (4096, 3072)], "copy_mb": 256, "flux": dict(heads=24, head_dim=128,
        joint=4096, pooled=768, in_ch=64, rope=(16, 56, 56), tokens=4096, text=512), "seq": 1024, "heads": 8, "dim": 64}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn: Callable[[], Any], dev: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ---- sections ------------------------------------------------------------------------------------

def cuda_tests(p: dict, dev: torch.device, timeout: float) -> dict:
    if dev.type != "cuda":
        return {"status": "skipped", "note": "no CUDA device (the CUDA tests skip themselves without one)"}
    files = [str(f) for f in [REPO / "tests/test_parallel_cuda.py", *sorted((REPO / "tests").glob("test_fused*.py"))]
             if f.exists()]
    if not files:
        return {"status": "skipped", "note": f"no test files under {REPO / 'tests'} (installed without the repo?)"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files], cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    return {"status": "ok" if r.returncode == 0 else "failed", "files": files, "returncode": r.returncode, "tail": tail}


def _impl_codec(spec: str, impl: str):
    from compactfusion.codecs import get_codec
    try:
        return get_codec(spec, impl=impl)
    except TypeError:  # a get_codec without impl=: the classes take it
        return type(get_codec(spec))(impl=impl)


def kernels(p: dict, dev: torch.device, reps: int) -> dict:
    try:
        from compactfusion.codecs import fused
        backend = fused.backend("fused", dev)
    except (ImportError, AttributeError) as e:
        return {"status": "skipped", "note": f"compactfusion.codecs exposes no fused kernels ({e})"}
    except RuntimeError as e:
        return {"status": "skipped", "note": f"no fused kernels for {dev}: {e}"}
    n_copy = p["copy_mb"] * 2**20
    src, dst = torch.empty(n_copy, dtype=torch.uint8, device=dev), torch.empty(n_copy, dtype=torch.uint8, device=dev)
    copy_s = _time(lambda: dst.copy_(src), dev, reps)
    rows, ok = [], True
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for n, c in p["kernel_shapes"]:
        x = torch.randn(n, c, generator=g).to(dev, dtype)
        clone_s = _time(lambda: x.clone(), dev, reps)
        for spec in ("binary", "int2"):
            ref, fus = _impl_codec(spec, "reference"), _impl_codec(spec, "fused")
            pr, pf = ref.encode(x), fus.encode(x)
            same_bytes = bool(torch.equal(pr, pf))
            same_rec = bool(torch.equal(ref.decode(pr, (n, c), dtype), fus.decode(pf, (n, c), dtype)))
            row = {"spec": spec, "shape": [n, c], "dtype": str(dtype), "backend": backend, "same_bytes": same_bytes,
                   "same_reconstruction": same_rec}
            for name, codec in (("reference", ref), ("fused", fus)):
                t = _time(lambda: codec.decode(codec.encode(x), (n, c), dtype), dev, reps)
                row[f"{name}_encdec_s"] = t
                row[f"{name}_x_clone"] = t / clone_s
                row[f"{name}_GBps"] = x.numel() * x.element_size() / t / 1e9
            row["fused_vs_copy_bw"] = row["fused_GBps"] / (n_copy / copy_s / 1e9)
            ok &= same_bytes and same_rec
            rows.append(row)
    return {"status": "ok" if ok else "failed", "copy_GBps": n_copy / copy_s / 1e9, "copy_bytes": n_copy,
            "rows": rows, "note": "GBps = input bytes / (encode+decode) time; copy_GBps = bytes / copy time"}


def _init_single(dev: torch.device) -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        return
    from compactfusion.comm.device import init_distributed
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30))
    init_distributed(dev, 60.0, store=store, rank=0, world_size=1)  # cpu:gloo,cuda:nccl on CUDA, as the CLI


def pipeline(p: dict, dev: torch.device, steps: int = 3) -> dict:
    from diffusers import FluxTransformer2DModel

    import compactfusion as cf
    from compactfusion.parallel import ParallelConfig
    from compactfusion.residual import CompressionConfig

    f = p["flux"]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    _init_single(dev)
    torch.manual_seed(0)
    with torch.device(dev):
        model = FluxTransformer2DModel(patch_size=1, in_channels=f["in_ch"], num_layers=2, num_single_layers=2,
                                       attention_head_dim=f["head_dim"], num_attention_heads=f["heads"],
                                       joint_attention_dim=f["joint"], pooled_projection_dim=f["pooled"],
                                       axes_dims_rope=f["rope"]).to(dtype).eval()
    side = int(f["tokens"] ** 0.5)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1)
    inputs = dict(hidden_states=torch.randn(1, f["tokens"], f["in_ch"], generator=g).to(dev, dtype),
                  encoder_hidden_states=torch.randn(1, f["text"], f["joint"], generator=g).to(dev, dtype),
                  pooled_projections=torch.randn(1, f["pooled"], generator=g).to(dev, dtype),
                  img_ids=ids.reshape(-1, 3).to(dev, dtype), txt_ids=torch.zeros(f["text"], 3, device=dev, dtype=dtype),
                  return_dict=False)
    times = [torch.tensor([1.0 - i / steps], device=dev, dtype=dtype) for i in range(steps)]

    def run():
        with torch.no_grad():
            return [model(timestep=t, **inputs)[0] for t in times]
    t0 = time.perf_counter()
    ref = run()
    _sync(dev)
    ref_s = time.perf_counter() - t0
    cf.parallelize(model, ParallelConfig(strategy="ring", compression=CompressionConfig(codec="binary", warmup_steps=1)))
    try:
        cf.reset(model)
        run()  # warm-up of the parallel path
        cf.reset(model)
        syncs = 0
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                out = run()
                _sync(dev)
                par_s = time.perf_counter() - t0
            syncs = sum("synchroniz" in str(w.message) for w in caught)
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        stats = cf.stats(model)
    finally:
        cf.unparallelize(model)
    errs = [_rel(o, r) for o, r in zip(out, ref)]
    finite = all(bool(torch.isfinite(o).all()) for o in out)
    ok = finite and out[0].device.type == dev.type and out[0].dtype == dtype and max(errs) < 5e-2
    return {"status": "ok" if ok else "failed", "tokens": f["tokens"], "text_tokens": f["text"], "dtype": str(dtype),
            "steps": steps, "rel_err_vs_plain": errs, "finite": finite, "plain_s": ref_s, "parallel_s": par_s,
            "host_syncs_in_parallel_run": syncs if dev.type == "cuda" else None,
            "ledger": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))} if isinstance(stats, dict) else None}


def two_rank_worker(rank: int, port: int, dev_name: str, smoke: bool) -> dict:
    """One of the 2 gloo ranks (run in a child process)."""
    import torch.distributed as dist

    from compactfusion.comm import Communicator
    from compactfusion.parallel import ParallelConfig, ParallelContext, reference_attention

    torch.set_num_threads(1)
    dev = torch.device(dev_name)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    p = SMOKE if smoke else FULL
    out: dict[str, Any] = {}
    comm = Communicator(None, timeout_s=30.0)
    out["control_device"] = str(comm.control_device)
    x = torch.arange(6, device=dev, dtype=torch.float32) + 10 * rank
    got = comm.all_gather_tensors(x)
    out["all_gather_ok"] = all(g.device == dev and torch.equal(g.cpu(), torch.arange(6.0) + 10 * r) for r, g in enumerate(got))
    h = comm.ring_exchange(x, 6, dst=1 - rank, src=1 - rank).wait()
    out["ring_ok"] = h.device == dev and torch.equal(h.cpu(), torch.arange(6.0) + 10 * (1 - rank))
    chunks = [torch.full((3 + j,), rank, dtype=torch.uint8, device=dev) for j in range(2)]
    a2a = comm.all_to_all_bytes(chunks, [3 + rank, 3 + rank])
    out["a2a_ok"] = all(c.device == dev and c.numel() == 3 + rank and int(c[0]) == i for i, c in enumerate(a2a))
    out["objects_ok"] = comm.all_gather_object({(0, "k", rank): rank}) == [{(0, "k", 0): 0}, {(0, "k", 1): 1}]
    comm.barrier()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(3)
    S, H, D = p["seq"], p["heads"], p["dim"]
    full = [torch.randn(1, 2 * S, H, D, generator=g) for _ in range(3)]
    drift = [torch.randn(1, 2 * S, H, D, generator=g) for _ in range(3)]
    errs = {}
    for strategy in ("ring", "ulysses"):
        ctx = ParallelContext(ParallelConfig(strategy=strategy, compression="binary", timeout_s=30.0))
        e = []
        for step in range(3):  # step 0 is the exact warm-up, later steps send compressed residuals
            qkv = [t + 0.1 * step * d for t, d in zip(full, drift)]
            ref = reference_attention(*[t.to(dtype).float() for t in qkv])[:, rank * S:(rank + 1) * S]
            q, k, v = (t[:, rank * S:(rank + 1) * S].to(dev, dtype) for t in qkv)
            o = ctx.attention(q, k, v, layer=0, step=step)
            if o.device != dev or o.dtype != dtype:
                raise RuntimeError(f"{strategy}: output on {o.device} {o.dtype}, expected {dev} {dtype}")
            e.append(_rel(o.cpu(), ref))
        ctx.check_consistency(2)
        errs[strategy] = e
        ctx.close()
    out["attention_rel_err"] = errs
    dist.destroy_process_group()
    return out


def two_ranks(p: dict, dev: torch.device, smoke: bool, timeout: float) -> dict:
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "compactfusion.bench.gpu_check", "--worker"]
    procs = [subprocess.Popen(cmd + [str(r), str(store.port), str(dev)] + (["--cpu-smoke"] if smoke else []),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    results, errors = [], []
    deadline = time.monotonic() + timeout
    for r, pr in enumerate(procs):
        try:
            so, se = pr.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {"status": "failed", "error": f"rank {r} did not finish within {timeout:g} s"}
        line = [ln for ln in so.splitlines() if ln.startswith("RESULT ")]
        if pr.returncode != 0 or not line:
            errors.append(f"rank {r} exit {pr.returncode}: {se.strip()[-1500:]}")
        else:
            results.append(json.loads(line[-1][7:]))
    if errors:
        return {"status": "failed", "errors": errors}
    ok = all(res[k] for res in results for k in ("all_gather_ok", "ring_ok", "a2a_ok", "objects_ok"))
    tol0 = 2e-2 if dev.type == "cuda" else 1e-4
    ok &= all(e[0] < tol0 and max(e) < 0.5 for res in results for e in res["attention_rel_err"].values())
    return {"status": "ok" if ok else "failed", "device": str(dev), "ranks": results,
            "note": "gloo cannot carry CUDA tensors point-to-point: payloads are staged through the CPU"}


# ---- driver --------------------------------------------------------------------------------------

def run(smoke: bool, reps: int = 5, timeout: float = 240.0) -> dict:
    dev = torch.device("cuda", 0) if (torch.cuda.is_available() and not smoke) else torch.device("cpu")
    p = SMOKE if smoke else FULL
    report: dict[str, Any] = {"mode": "cpu-smoke" if smoke else "gpu", "device": str(dev),
                              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                              "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if not smoke and dev.type != "cuda":
        report["note"] = "no CUDA device: ran the CPU parts at full size; CUDA-only sections are skipped"
    sections = [("cuda_tests", lambda: cuda_tests(p, dev, timeout)), ("kernels", lambda: kernels(p, dev, reps)),
                ("pipeline", lambda: pipeline(p, dev)), ("two_ranks", lambda: two_ranks(p, dev, smoke, timeout / 2))]
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.perf_counter() - t0, 3)
        report[name] = res
    report["ok"] = all(report[n]["status"] != "failed" for n, _ in sections)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compactfusion.bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON report path (default: gpu_check.json)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    ap.add_argument("--worker", nargs=3, metavar=("RANK", "PORT", "DEVICE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        res = two_rank_worker(int(a.worker[0]), int(a.worker[1]), a.worker[2], a.cpu_smoke)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if a.reps < 1:
        ap.error("--reps must be >= 1")
    report = run(a.cpu_smoke, a.reps)
    Path(a.out).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: (v["status"] if isinstance(v, dict) and "status" in v else v) for k, v in report.items()}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
