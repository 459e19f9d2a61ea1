"""compactfusion.parallel on CUDA (skipped without a GPU): the attention-with-LSE backends and merge,
the stream coder's sender/receiver agreement on device tensors, and a one-rank context on CUDA tensors."""
from __future__ import annotations

import pytest
import torch

from compactfusion.parallel import attention_with_lse, merge_partials, reference_attention
from compactfusion.parallel.streams import StreamCoder
from compactfusion.residual import CompressionConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("backend", ["auto", "cuda_fused", "portable"])
def test_blockwise_attention_cuda(dtype, tol, backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 77, 4, 64, device="cuda", generator=g).to(dtype)
    k = torch.randn(2, 130, 4, 64, device="cuda", generator=g).to(dtype)
    v = torch.randn(2, 130, 4, 64, device="cuda", generator=g).to(dtype)
    ref = reference_attention(q.float(), k.float(), v.float())
    o1, l1 = attention_with_lse(q, k[:, :50], v[:, :50], backend=backend)
    o2, l2 = attention_with_lse(q, k[:, 50:], v[:, 50:], backend=backend)
    assert o1.dtype == torch.float32 and l1.shape == (2, 4, 77)
    out, lse = merge_partials(o1, l1, o2, l2)
    assert rel(out, ref) <= tol
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / 8.0
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=tol * 10)


@pytest.mark.parametrize("codec", ["binary", "int4", "lowrank:8", "none"])
def test_stream_coder_agrees_on_cuda(codec):
    comp = CompressionConfig(codec=codec, warmup_steps=1)
    tx, rx = StreamCoder(comp, ("k",)), StreamCoder(comp, ("k",))
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 33, 4, 16, device="cuda", generator=g)
    for step in range(4):
        x = x + 0.1 * torch.randn(x.shape, device="cuda", generator=g)
        payload, x_hat = tx.encode((0, "k", 0), "k", x, 0, step)
        assert payload.device.type == "cuda" and payload.numel() == tx.wire_nbytes("k", 0, step, x.shape, x.dtype)
        got = rx.decode((0, "k", 0), "k", payload, x.shape, x.dtype, 0, step)
        assert torch.equal(got, x_hat)
    assert tx.checksums() == rx.checksums()


def _one_rank_cuda(rank, world):
    from compactfusion.parallel import ParallelConfig, ParallelContext
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(2, 40, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    jq, jk, jv = (torch.randn(2, 5, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    ref = reference_attention(torch.cat([q, jq], 1).float(), torch.cat([k, jk], 1).float(), torch.cat([v, jv], 1).float())
    errs = []
    for strategy in ("none", "ring", "ulysses", "patch"):
        ctx = ParallelContext(ParallelConfig(strategy=strategy, compression="binary"))
        out, jout = ctx.attention(q, k, v, layer=0, step=0, joint_q=jq, joint_k=jk, joint_v=jv)
        assert out.device.type == "cuda" and out.dtype == torch.bfloat16
        errs.append(max(rel(out, ref[:, :40]), rel(jout, ref[:, 40:])))
    return errs


def test_one_rank_context_on_cuda():
    from distributed import run_distributed
    errs = run_distributed(_one_rank_cuda, 1, timeout=120)[0]
    assert max(errs) < 2e-2, errs


# ---- real NCCL / mixed groups (plain subprocesses: tests/distributed.py always uses gloo) -------------

_NCCL_SCRIPT = r"""
import json, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from compactfusion.comm.device import nccl_environment
rank, world, port, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
nccl_environment()
torch.cuda.set_device(rank)
store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timedelta(seconds=60))
dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60),
                        device_id=torch.device("cuda", rank))
from compactfusion.comm import Communicator, CommTimeoutError
from compactfusion.parallel import ParallelConfig, ParallelContext, reference_attention
dev, out = torch.device("cuda", rank), {}
comm = Communicator(None, timeout_s=20.0)
out["control"] = comm.control_device.type
x = torch.arange(4, device=dev) + 10 * rank
out["gather"] = [(t.device.type, t.cpu().tolist()) for t in comm.all_gather_tensors(x)]
out["ring"] = comm.ring_exchange(x, 4, dst=(rank + 1) % world, src=(rank - 1) % world).wait().cpu().tolist()
out["objects"] = comm.all_gather_object({(0, "k", rank): [rank, None]}) == [{(0, "k", r): [r, None]} for r in range(world)]
comm.barrier()
g = torch.Generator(device="cpu").manual_seed(0)
S = 48
full = [torch.randn(1, world * S, 4, 64, generator=g) for _ in range(3)]
ref = reference_attention(*[t.to(torch.bfloat16).float() for t in full])[:, rank * S:(rank + 1) * S]
out["err"] = {}
for strategy in ("ring", "ulysses"):
    ctx = ParallelContext(ParallelConfig(strategy=strategy, compression="binary", timeout_s=20.0))
    q, k, v = (t[:, rank * S:(rank + 1) * S].to(dev, torch.bfloat16) for t in full)
    o = ctx.attention(q, k, v, layer=0, step=0)
    out["err"][strategy] = [o.device.type, float((o.float().cpu() - ref).norm() / ref.norm())]
    ctx.check_consistency(0)
if world > 1:  # a peer that skips an op: our CommTimeoutError, not NCCL's watchdog
    short = comm.subgroup(range(world), timeout_s=2.0)
    short.all_gather_tensors(x)  # NCCL builds a pair's communicator at its first op, blocking: warm it first
    if rank == 0:
        t0 = time.monotonic()
        try:
            short.all_gather_tensors(x)
            out["timeout"] = "no error"
        except CommTimeoutError as e:
            out["timeout"] = ["CommTimeoutError", time.monotonic() - t0]
    else:
        time.sleep(6)
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)
"""


def _run_nccl(world: int, backend: str) -> list[dict]:
    import json
    import subprocess
    import sys
    from datetime import timedelta

    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=120))
    procs = [subprocess.Popen([sys.executable, "-c", _NCCL_SCRIPT, str(r), str(world), str(store.port), backend],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    res = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=180)
            lines = [ln for ln in so.splitlines() if ln.startswith("RESULT ")]
            assert p.returncode == 0 and lines, se[-3000:]
            res.append(json.loads(lines[-1][7:]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return res


@pytest.mark.parametrize("backend,control", [("cpu:gloo,cuda:nccl", "cpu"), ("nccl", "cuda")])
def test_nccl_groups(backend, control):
    world = min(2, torch.cuda.device_count())
    for r, out in enumerate(_run_nccl(world, backend)):
        assert out["control"] == control
        assert out["gather"] == [("cuda", [10 * s + i for i in range(4)]) for s in range(world)]
        assert out["ring"] == [10 * ((r - 1) % world) + i for i in range(4)] and out["objects"]
        for strategy, (dev, err) in out["err"].items():
            assert dev == "cuda" and err < 2e-2, (strategy, err)
        if world > 1 and r == 0:
            kind, took = out["timeout"]
            assert kind == "CommTimeoutError" and 1.9 <= took < 10, out["timeout"]
