"""Triton kernels for ``binary``/``int2`` on CUDA; on CPU tensors they run in Triton's interpreter.

Split of the work, chosen so the payload is the reference's byte for byte on the same device:
torch computes everything whose result depends on an implementation's summation order or
rounding (the |x| row/column sums, mean, sqrt, the reciprocal 1/b: the very calls sign.py makes);
the kernels do the full-size elementwise work in one pass each: |x| and the packed sign bits,
the int2 fields, and the decode (level * b[c]) * a[n] with the output cast. Kernels contain only
multiplies, compares and integer ops, so no FMA contraction can change a bit.

Interpreter mode (``get_codec(spec, impl="triton")`` with CPU tensors, in a process started with
TRITON_INTERPRET=1, which must be set before triton is first imported) exists for CI without a
GPU; it is slow and only meant for small shapes.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..numeric import FP16_MAX
from ..packing import bytes_as

#: Packed bytes per program along a row (8 fields each for binary, 4 for int2).
BLOCK = 128


def available() -> bool:
    return True


def interpreting() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (kernels then run on CPU tensors)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _abs_bits(x_ptr, ab_ptr, bits_ptr, c, p, ldx, WRITE_BITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # packed byte index within the row
    i = tl.arange(0, 8)
    col = j[:, None] * 8 + i[None, :]
    m = col < c
    v = tl.load(x_ptr + row * ldx + col, mask=m, other=-1.0).to(tl.float32)
    tl.store(ab_ptr + row * c + col, tl.abs(v), mask=m)
    if WRITE_BITS:
        byte = tl.sum((v >= 0).to(tl.int32) << i[None, :], axis=1)  # pad lanes load -1: bit 0
        tl.store(bits_ptr + row * p + j, byte.to(tl.uint8), mask=j < p)


def _int2_fields(x_ptr, a_ptr, inv_b_ptr, out_ptr, c, p, ldx, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i = tl.arange(0, 4)
    col = j[:, None] * 4 + i[None, :]
    m = col < c
    v = tl.load(x_ptr + row * ldx + col, mask=m, other=-1.0).to(tl.float32)
    inv_b = tl.load(inv_b_ptr + col, mask=m, other=0.0)
    a = tl.load(a_ptr + row)
    mag = (tl.abs(v) * inv_b > a).to(tl.int32)  # pad: 0 * 0 > a >= 0 is false
    field = ((v >= 0).to(tl.int32) << 1) | mag
    byte = tl.sum(field << (2 * i)[None, :], axis=1)
    tl.store(out_ptr + row * p + j, byte.to(tl.uint8), mask=j < p)


def _decode(f_ptr, a_ptr, b_ptr, out_ptr, c, p, lv0, lv1, lv2, lv3, fmax,
            BITS: tl.constexpr, OUT_F16: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    PER: tl.constexpr = 8 // BITS
    i = tl.arange(0, PER)
    col = j[:, None] * PER + i[None, :]
    m = col < c
    byte = tl.load(f_ptr + row * p + j, mask=j < p, other=0).to(tl.int32)
    field = (byte[:, None] >> (i * BITS)[None, :]) & ((1 << BITS) - 1)
    if BITS == 1:
        lvl = tl.where(field == 1, lv1, lv0)
    else:
        lvl = tl.where(field == 0, lv0, tl.where(field == 1, lv1, tl.where(field == 2, lv2, lv3)))
    b = tl.load(b_ptr + col, mask=m, other=0.0)
    a = tl.load(a_ptr + row)
    v = (lvl * b) * a
    if OUT_F16:
        v = tl.minimum(tl.maximum(v, -fmax), fmax).to(tl.float16)  # saturate like numeric.finish
    tl.store(out_ptr + row * c + col, v, mask=m)


@functools.cache
def _kernels():
    return triton.jit(_abs_bits), triton.jit(_int2_fields), triton.jit(_decode)


def _k(device: torch.device):
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 before triton is imported"
        )
    return _kernels()


def encode(codec, x: torch.Tensor, bits: int, blocks: list[slice]) -> torch.Tensor | None:
    from ..sign import sign_scales  # sign imports this package

    n, c = x.shape
    xk = x.float() if x.dtype == torch.float64 else x
    if xk.stride(1) != 1:
        xk = xk.contiguous()
    abs_bits, int2_fields, _ = _k(x.device)
    p = -(-c // (8 // bits))
    payload = torch.empty(n * p + 2 * (n + c), dtype=torch.uint8, device=x.device)
    tok = torch.empty(n, dtype=torch.float32, device=x.device)
    chan = torch.zeros(c, dtype=torch.float32, device=x.device)
    buf = torch.empty(blocks[0].stop - blocks[0].start, c, dtype=torch.float32, device=x.device)
    grid_p = triton.cdiv(-(-c // 8), BLOCK)  # lanes = bytes of a binary row
    for rows in blocks:  # one block on accelerators; the loop mirrors sign._abs_sums
        k = rows.stop - rows.start
        ab = buf[:k]
        abs_bits[(k, grid_p)](xk[rows], ab, payload[rows.start * p:], c, p, xk.stride(0),
                              WRITE_BITS=bits == 1, BLOCK=BLOCK)
        torch.sum(ab, 1, out=tok[rows])
        chan += ab.sum(0)
    a16, b16 = sign_scales(codec, x, x, blocks, sums=(tok.div_(c), chan.div_(n)))
    if bits == 2:
        a32 = a16.float()
        inv_b = torch.reciprocal(b16.float())
        int2_fields[(n, triton.cdiv(p, BLOCK))](xk, a32, inv_b, payload, c, p, xk.stride(0), BLOCK=BLOCK)
    payload[n * p:n * p + 2 * n].copy_(a16.view(torch.uint8))
    payload[n * p + 2 * n:].copy_(b16.view(torch.uint8))
    return payload


def decode(payload: torch.Tensor, n: int, c: int, bits: int, levels, dtype) -> torch.Tensor:
    p = -(-c // (8 // bits))
    a = bytes_as(payload[n * p:n * p + 2 * n], torch.float16, (n,)).float()
    b = bytes_as(payload[n * p + 2 * n:], torch.float16, (c,)).float()
    lv = tuple(float(v) for v in levels) + (0.0,) * (4 - len(levels))
    f16 = dtype == torch.float16
    out = torch.empty(n, c, dtype=torch.float16 if f16 else torch.float32, device=payload.device)
    fields = payload[: n * p]
    if not fields.is_contiguous():
        fields = fields.contiguous()
    _, _, dec = _k(payload.device)
    dec[(n, triton.cdiv(p, BLOCK))](fields, a, b, out, c, p, *lv, FP16_MAX, BITS=bits, OUT_F16=f16, BLOCK=BLOCK)
    return out if dtype in (torch.float16, torch.float32) else out.to(dtype)
