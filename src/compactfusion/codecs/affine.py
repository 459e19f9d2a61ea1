"""Per-channel asymmetric integer codecs ``int8`` and ``int4``, plus the affine helpers that
``lowrank-int4`` reuses for its factors.

x_hat = q * scale + min, scale and min per channel, both sent as sq16 (numeric.py). The encoder
rounds min *down* and scale *up* on the wire values and quantises against those, so every
element lies inside [min, min + L*scale] and the error is at most scale/2 (no clipping).
"""
from __future__ import annotations

import torch

from .base import Codec, CodecState
from .numeric import finish, row_blocks, sq16_decode, sq16_encode
from .packing import (
    bytes_as,
    concat_bytes,
    field_buffer,
    lut_decode,
    pack_fields,
    packed_len,
    split_bytes,
)


def affine_params(mn: torch.Tensor, mx: torch.Tensor, bits: int):
    """Wire (sq16) scale/min and their exact fp32 values for ranges [mn, mx]."""
    levels = (1 << bits) - 1
    m16 = sq16_encode(mn, "down")
    m32 = sq16_decode(m16)
    s16 = sq16_encode((mx - m32) / levels, "up")
    s32 = sq16_decode(s16)
    return s16, m16, s32, m32


def affine_fields(x32: torch.Tensor, s32: torch.Tensor, m32: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Write round((x - min) / scale), clamped to [0, 2**bits - 1], into the uint8 view ``out``.

    ``s32``/``m32`` must already broadcast against ``x32``. A zero scale (constant range) maps to 0.
    """
    inv = torch.where(s32 > 0, torch.reciprocal(s32), torch.zeros_like(s32))
    # (x - m) / s + 0.5 in one pass; the float -> uint8 copy truncates, so this rounds half up.
    t = torch.addcmul(0.5 - m32 * inv, x32, inv)
    t.clamp_(0, (1 << bits) - 1)  # only bites for inputs beyond the sq16 range
    out.copy_(t)


def affine_fields_blocked(
    x32: torch.Tensor, s32: torch.Tensor, m32: torch.Tensor, bits: int, out: torch.Tensor, clamp: bool
) -> None:
    """:func:`affine_fields` for per-column parameters, block of rows by block of rows.

    ``clamp=False`` is only valid when the wire range covers [min, max] of every column (no sq16
    saturation): then (x - m)/s + 1/2 lies in [1/2, L + 1/2] up to fp32 rounding and truncates
    into [0, L] without a clamp pass.
    """
    n, c = x32.shape
    inv = torch.where(s32 > 0, torch.reciprocal(s32), torch.zeros_like(s32))
    shift = 0.5 - m32 * inv
    blocks = row_blocks(n, c, x32.device)
    buf = torch.empty(blocks[0].stop - blocks[0].start, c, dtype=torch.float32, device=x32.device)
    for rows in blocks:
        xb = x32[rows]
        t = torch.addcmul(shift, xb, inv, out=buf[: xb.shape[0]])
        if clamp:
            t.clamp_(0, (1 << bits) - 1)
        out[rows].copy_(t)


def affine_decode_blocked(levels_of, n: int, c: int, s32: torch.Tensor, m32: torch.Tensor, device) -> torch.Tensor:
    """out[rows] = levels_of(rows) * scale + min for per-column parameters, block by block."""
    out = torch.empty(n, c, dtype=torch.float32, device=device)
    for rows in row_blocks(n, c, device):
        o = out[rows]
        torch.mul(levels_of(rows), s32, out=o)
        o.add_(m32)
    return out


def affine_levels(levels: torch.Tensor, s32: torch.Tensor, m32: torch.Tensor) -> torch.Tensor:
    """q * scale + min as two separately rounded ops (no FMA => identical bits on every device)."""
    out = levels.mul_(s32) if levels.is_contiguous() else torch.mul(levels, s32)
    return out.add_(m32)


class AffineCodec(Codec):
    """``int8`` / ``int4``: [q][scale: C sq16][min: C sq16].

    int8: q is N*C bytes, row-major. int4: nibbles packed along C, LSB-first (element 2j in the
    low nibble), each row padded to ceil(C/2) bytes with a zero nibble.
    """

    def __init__(self, bits: int):
        if bits not in (4, 8):
            raise ValueError(f"affine codec supports 4 or 8 bits, got {bits}")
        self.bits = bits
        self.spec = f"int{bits}"

    def _qbytes(self, n: int, c: int) -> int:
        return n * c if self.bits == 8 else n * packed_len(c, 4)

    def encoded_nbytes(self, n: int, c: int) -> int:
        return self._qbytes(n, c) + 4 * c

    def encode(self, x: torch.Tensor, state: CodecState | None = None) -> torch.Tensor:
        n, c = self._check_input(x)
        xf = x.float()
        # Separate amin/amax: torch.aminmax over dim 0 is several times slower on CPU.
        mn, mx = xf.amin(0), xf.amax(0)
        self._check_finite(x, probe=mn + mx)  # amin/amax propagate NaN; Inf shows in min/max
        s16, m16, s32, m32 = affine_params(mn, mx, self.bits)
        levels = (1 << self.bits) - 1
        # The clamp pass is needed only where sq16 saturated, or where a large offset relative to
        # the step (|x| / scale > 2**20) lets fp32 rounding in x/s - m/s push a value off [0, L].
        saturated = (mn < m32) | (mx - m32 > s32 * levels * (1 + 1e-6))
        offset = torch.maximum(mn.abs(), mx.abs()) > s32 * 2.0**20
        clamp = bool((saturated | offset).any())
        if self.bits == 8:
            q = torch.empty(n, c, dtype=torch.uint8, device=x.device)
            affine_fields_blocked(xf, s32, m32, 8, q, clamp=clamp)
        else:
            buf, view = field_buffer(n, c, 4, x.device)
            affine_fields_blocked(xf, s32, m32, 4, view, clamp=clamp)
            q = pack_fields(buf, 4)
        return concat_bytes([q, s16, m16])

    def decode(self, payload: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, c = self._check_decode_args(payload, shape, dtype)
        qb, sb, mb = split_bytes(payload, [self._qbytes(n, c), 2 * c, 2 * c])
        s32 = sq16_decode(bytes_as(sb, torch.float16, (c,)))
        m32 = sq16_decode(bytes_as(mb, torch.float16, (c,)))
        if self.bits == 8:
            q = qb.view(n, c)
            levels_of = lambda rows: q[rows].to(torch.float32)  # noqa: E731
        else:
            q = qb.view(n, packed_len(c, 4))
            values = torch.arange(16, dtype=torch.float32, device=payload.device)
            levels_of = lambda rows: lut_decode(q[rows], 4, values, c)  # noqa: E731
        return finish(affine_decode_blocked(levels_of, n, c, s32, m32, payload.device), dtype)
