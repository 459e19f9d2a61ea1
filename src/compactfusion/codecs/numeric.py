"""16-bit scalar encodings and fp32 helpers shared by the codecs.

Two tricks keep fp16 wire scalars away from underflow/overflow without spending header bytes:

* **Balanced factor pairs** (binary/int2 token x channel scales, low-rank U x V): a product
  ``a[n] * b[c]`` is unchanged if a is multiplied and b divided by the same g (per rank component
  for low rank). Choosing g so that both factors peak at sqrt(max product) puts each factor near
  the middle of fp16's range, so products from ~4e-9 to ~4e9 keep full fp16 precision.
* **sq16** for standalone scalars (affine min/scale, top-k values): the wire holds
  ``f = fp16(sign(v) * sqrt(|v|))`` and the value is ``f * |f|``, computed in fp32 where the
  square of an 11-bit mantissa is exact. Relative precision 2**-10 (vs 2**-11 for plain fp16),
  range ~4e-9 .. 4.29e9 at full precision, graceful (subnormal) degradation down to ~4e-15,
  flush to zero below, clamp above. Never Inf, never NaN.
"""
from __future__ import annotations

import torch

FP16_MAX = 65504.0
#: Largest magnitude sq16 can carry (FP16_MAX ** 2).
SQ16_MAX = FP16_MAX * FP16_MAX
_TINY = torch.finfo(torch.float32).tiny


def to_fp16(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16 with saturation instead of Inf."""
    return v.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def sq16_decode(f: torch.Tensor) -> torch.Tensor:
    ff = f.to(torch.float32)
    return ff * ff.abs()


def sq16_encode(v: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
    """Encode fp32 ``v`` as sq16. ``rounding`` "down"/"up" guarantees decode <= v / >= v
    (within the representable range) so an encoder can bound a quantisation range safely."""
    r = torch.sqrt(v.abs()).clamp_(max=FP16_MAX).copysign_(v)
    f = r.to(torch.float16)
    if rounding == "nearest":
        return f
    d = sq16_decode(f)
    if rounding == "up":
        fix = (d < v) & (f < FP16_MAX)
        return torch.where(fix, torch.nextafter(f, torch.full_like(f, float("inf"))), f)
    if rounding == "down":
        fix = (d > v) & (f > -FP16_MAX)
        return torch.where(fix, torch.nextafter(f, torch.full_like(f, float("-inf"))), f)
    raise ValueError(f"rounding must be nearest/up/down, got {rounding!r}")


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with den clamped to the smallest normal fp32: 0/0 -> 0, never NaN."""
    return num / den.clamp_min(_TINY)


def balance_gain(a_max: torch.Tensor, b_max: torch.Tensor) -> torch.Tensor:
    """g with max(a*g) == max(b/g) == sqrt(a_max*b_max); 1 where either side is all zero.

    Stays on device (no host sync); works elementwise for per-component gains.
    """
    ok = (a_max > 0) & (b_max > 0)
    g = torch.sqrt(safe_div(b_max, a_max))
    return torch.where(ok, g, torch.ones_like(g))


def finish(out32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast an fp32 reconstruction to the requested dtype; fp16 saturates instead of overflowing."""
    if dtype == torch.float32:
        return out32
    out = out32.to(dtype)
    if dtype == torch.float16:
        torch.nan_to_num_(out, posinf=FP16_MAX, neginf=-FP16_MAX)
    return out


#: Rows are processed in blocks of about this many elements on CPU (8 MiB of fp32): temporaries
#: stay in the last-level cache and are recycled by the allocator instead of page-faulting a fresh
#: full-size tensor per pass. Accelerators take the whole tensor in one block (fewer launches).
CPU_BLOCK_ELEMS = 1 << 21


def row_blocks(n: int, c: int, device) -> list[slice]:
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if kind != "cpu" or n * c <= CPU_BLOCK_ELEMS:
        return [slice(0, n)]
    rows = max(1, CPU_BLOCK_ELEMS // max(c, 1))
    return [slice(r, min(n, r + rows)) for r in range(0, n, rows)]
