"""Per-channel asymmetric integer codecs ``int8`` and ``int4``, plus the affine helpers that
``lowrank-int4`` reuses for its factors.

x_hat = q * scale + min, scale and min per channel, both sent as sq16 (numeric.py). The encoder
rounds min *down* and scale *up* on the wire values and quantises against those, so every
element lies inside [min, min + L*scale] and the error is at most scale/2 (no clipping).
"""
from __future__ import annotations

import torch

from .base import Codec, CodecState
from .numeric import finish, sq16_decode, sq16_encode
from .packing import (
    bytes_as,
    concat_bytes,
    field_buffer,
    field_lut,
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
    t = torch.addcmul(-m32 * inv, x32, inv)  # (x - m) / s in one pass; encoder-only rounding
    t.round_().clamp_(0, (1 << bits) - 1)
    out.copy_(t)


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
        mn, mx = torch.aminmax(xf, dim=0)
        self._check_finite(x, probe=mn + mx)  # aminmax propagates NaN; Inf shows in min/max
        s16, m16, s32, m32 = affine_params(mn, mx, self.bits)
        if self.bits == 8:
            q = torch.empty(n, c, dtype=torch.uint8, device=x.device)
            affine_fields(xf, s32, m32, 8, q)
        else:
            buf, view = field_buffer(n, c, 4, x.device)
            affine_fields(xf, s32, m32, 4, view)
            q = pack_fields(buf, 4)
        return concat_bytes([q, s16, m16])

    def decode(self, payload: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, c = self._check_decode_args(payload, shape, dtype)
        qb, sb, mb = split_bytes(payload, [self._qbytes(n, c), 2 * c, 2 * c])
        s32 = sq16_decode(bytes_as(sb, torch.float16, (c,)))
        m32 = sq16_decode(bytes_as(mb, torch.float16, (c,)))
        if self.bits == 8:
            levels = qb.view(n, c).to(torch.float32)
        else:
            lut = field_lut(4, torch.arange(16, dtype=torch.float32, device=payload.device))
            levels = lut_decode(qb.view(n, packed_len(c, 4)), lut, c)
        return finish(affine_levels(levels, s32, m32), dtype)
