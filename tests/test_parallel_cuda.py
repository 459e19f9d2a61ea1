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
