"""Block attention with log-sum-exp, and the LSE merge that makes blockwise attention exact.

Layout everywhere in ``compactfusion.parallel``: ``(B, S, H, D)`` (batch, tokens, heads, head dim).
Partial results are kept in float32 whatever the input dtype: ``out`` is ``(B, Sq, H, D)`` and ``lse``
(the log of the softmax denominator of each query row) is ``(B, H, Sq)``.

Merging two partial results over disjoint key sets (the standard ring-attention rule):
    o <- o_prev - sigmoid(l - l_prev) * (o_prev - o),   l <- l_prev - logsigmoid(l_prev - l)
which equals softmax attention over the union of the key sets. The merge is not bitwise associative,
so code that needs the same bits on several ranks merges in a fixed order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["attention_with_lse", "merge_partials", "OnlineSoftmax", "reference_attention"]

# Upper bound on the number of float32 scores materialised at once by the portable path (256 MiB).
_MAX_SCORES = 1 << 26


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, S, H, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} "
                         f"v{tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q{tuple(q.shape)} and k{tuple(k.shape)} disagree on batch, heads or head dim")


def _portable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """float32 math on any device; chunks the queries so at most ``_MAX_SCORES`` scores live at once."""
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    rows = max(1, _MAX_SCORES // max(1, b * h * sk))
    outs, lses = [], []
    for i in range(0, sq, rows):
        s = torch.matmul(q[:, :, i:i + rows], k.transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k``/``v`` returning ``(out, lse)`` in float32.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D) with Sk >= 1. ``backend``: "auto" (CPU: the fused flash kernel
    in float32; CUDA: the fused flash / memory-efficient kernels in the input dtype, falling back to the
    portable path if they refuse the input; elsewhere the portable float32 path), "cpu_flash",
    "cuda_fused" or "portable" (float32 math on any device, queries chunked to bound memory).
    """
    _check_qkv(q, k, v)
    if k.shape[1] == 0:
        raise ValueError("attention over an empty key block is undefined; skip empty blocks before calling")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    b, sq, h, d = q.shape
    if sq == 0:
        return q.new_zeros((b, 0, h, d), dtype=torch.float32), q.new_zeros((b, h, 0), dtype=torch.float32)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {', '.join(_BACKENDS)}")
    if backend == "auto":
        if q.device.type == "cpu":
            backend = "cpu_flash"
        elif q.device.type == "cuda":
            try:  # fused kernels that also return the LSE; any refusal (shape, dtype, arch) -> portable
                return _cuda_fused(q, k, v, scale)
            except RuntimeError:
                backend = "portable"
        else:
            backend = "portable"
    if backend == "cuda_fused":
        return _cuda_fused(q, k, v, scale)
    # (B, S, H, D) -> (B, H, S, D) views; float32 so merging many blocks loses nothing.
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    if backend == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, False,
                                                                              scale=scale)[:2]
    else:
        out, lse = _portable(qh, kh, vh, scale)
    return out.transpose(1, 2), lse.float()


_BACKENDS = ("auto", "cpu_flash", "cuda_fused", "portable")


def _cuda_fused(q, k, v, scale):
    """CUDA: flash attention for fp16/bf16, memory-efficient attention for fp32 (both return the LSE)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    sq = q.shape[1]
    if q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, False, False,
                                                                      scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qh.float(), kh.float(), vh.float(), None, True, 0.0, False, scale=scale)[:2]
    return out.transpose(1, 2).float(), lse[:, :, :sq].float()  # the efficient kernel pads the LSE


def merge_partials(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge partial attention ``(out_b, lse_b)`` of a disjoint key block into ``(out, lse)``."""
    w = torch.sigmoid(lse_b - lse).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1): weight of the new block
    new_out = out - w * (out - out_b)
    new_lse = lse - F.logsigmoid(lse - lse_b)
    return new_out, new_lse


class OnlineSoftmax:
    """Accumulates partial results block by block (float32); ``result(dtype)`` casts once at the end."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out, lse
        else:
            self.out, self.lse = merge_partials(self.out, self.lse, out, lse)

    def add_block(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> None:
        """Attend ``q`` to one key block and merge it in; empty blocks (0 keys) contribute nothing."""
        if k.shape[1] > 0:
            self.add(*attention_with_lse(q, k, v, scale))

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        if self.out is None:
            raise ValueError("no key block was attended: the whole key sequence is empty")
        return self.out.to(dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain single-device attention in (B, S, H, D) layout, computed in float32 (for tests and benchmarks)."""
    _check_qkv(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                         v.transpose(1, 2).float(), scale=scale)
    return out.transpose(1, 2).to(q.dtype)
