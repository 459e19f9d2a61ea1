"""Low-rank codecs: ``lowrank:R`` (fp16 factors) and ``lowrank-int4:R`` (int4 factors).

Factorisation: randomised subspace iteration in fp32 with QR orthonormalisation,
``iters`` (default 2) power iterations, effective rank r = min(R, N, C):
    Q <- start (C, r);  repeat iters: Q <- orth(A^T (A Q));  U = orth(A Q);  V = U^T A.

Warm start (PowerSGD-style): with a ``CodecState``, the iteration starts from the right basis
left by the previous encode of the same stream (``state.data["Q"]``, (C, r) fp32, orthonormal)
when its shape matches, and stores orth(V^T) for the next call. Otherwise, and always without a
state, it starts from a Gaussian drawn from a private CPU ``torch.Generator`` seeded with
``LOWRANK_SEED``: deterministic, independent of and harmless to the global RNG. Receivers never
need the state: the factors are on the wire.
"""
from __future__ import annotations

import torch

from .affine import affine_fields, affine_levels, affine_params
from .base import Codec, CodecState
from .numeric import SQ16_MAX, balance_gain, finish, safe_div, sq16_decode, to_fp16
from .packing import (
    bytes_as,
    concat_bytes,
    field_buffer,
    lut_decode,
    pack_fields,
    packed_len,
    split_bytes,
)

LOWRANK_SEED = 20250723
DEFAULT_ITERS = 2
STATE_KEY = "Q"
#: Range shrink factors tried per rank component by lowrank-int4 (1.0 = plain min/max).
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def _orth(m: torch.Tensor) -> torch.Tensor:
    # Householder QR: zero or rank-deficient inputs give orthonormal columns, never NaN.
    return torch.linalg.qr(m, mode="reduced").Q


def _start_basis(c: int, r: int, device, state: CodecState | None, seed: int) -> torch.Tensor:
    if state is not None:
        q = state.data.get(STATE_KEY)
        if isinstance(q, torch.Tensor) and tuple(q.shape) == (c, r) and q.dtype == torch.float32:
            return q.to(device)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randn(c, r, generator=gen).to(device)


def subspace_iteration(a: torch.Tensor, q: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U (N, r) with orthonormal columns and V = U^T a (r, C), all fp32."""
    for _ in range(iters):
        y = a @ q
        # Rescaling the thin (N, r) product keeps a^T y inside fp32 range for huge or tiny inputs.
        y = safe_div(y, y.abs().amax())
        q = _orth(a.mT @ y)
    u = _orth(a @ q)
    return u, u.mT @ a


class _LowRankBase(Codec):
    def __init__(self, rank: int, iters: int = DEFAULT_ITERS, seed: int = LOWRANK_SEED):
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if int(iters) < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        self.rank = int(rank)
        self.iters = int(iters)
        self.seed = int(seed)

    def effective_rank(self, n: int, c: int) -> int:
        return min(self.rank, n, c)

    def _factorise(self, x: torch.Tensor, state: CodecState | None):
        n, c = self._check_input(x)
        xf = x.float()
        # sum |x| bounds every intermediate of the iteration; finite => no overflow (read-only pass).
        if not self._check_finite(x, probe=torch.linalg.vector_norm(xf, 1)):
            xf = xf.clamp(-SQ16_MAX, SQ16_MAX)  # finite but overflowing: saturate like the wire does
        r = self.effective_rank(n, c)
        q0 = _start_basis(c, r, x.device, state, self.seed)
        u, v = subspace_iteration(xf, q0, self.iters)
        if state is not None:
            state.data[STATE_KEY] = _orth(v.mT)
        # Balance each component so U and V peak at the same magnitude (fp16 range, numeric.py).
        d = balance_gain(u.abs().amax(0), v.abs().amax(1))
        return xf, u * d, safe_div(v, d[:, None]), r


class LowRankCodec(_LowRankBase):
    """``lowrank:R``: [U: (N, r) fp16 row-major][V: (r, C) fp16 row-major]; x_hat = U @ V in fp32."""

    def __init__(self, rank: int, iters: int = DEFAULT_ITERS, seed: int = LOWRANK_SEED):
        super().__init__(rank, iters, seed)
        self.spec = f"lowrank:{self.rank}"

    def encoded_nbytes(self, n: int, c: int) -> int:
        return 2 * self.effective_rank(n, c) * (n + c)

    def encode(self, x: torch.Tensor, state: CodecState | None = None) -> torch.Tensor:
        _, u, v, _ = self._factorise(x, state)
        return concat_bytes([to_fp16(u), to_fp16(v)])

    def decode(self, payload: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, c = self._check_decode_args(payload, shape, dtype)
        r = self.effective_rank(n, c)
        ub, vb = split_bytes(payload, [2 * n * r, 2 * r * c])
        u = bytes_as(ub, torch.float16, (n, r)).float()
        v = bytes_as(vb, torch.float16, (r, c)).float()
        # fp16 x fp16 products are exact in fp32; only the BLAS summation order over r can
        # differ, so bitwise reproducibility holds per device type and library build.
        return finish(u @ v, dtype)


class LowRankInt4Codec(_LowRankBase):
    """``lowrank-int4:R``: U^T (r, N) and V (r, C) quantised to int4 per rank component.

    Wire: [qU: r*ceil(N/2)][sU: r sq16][mU: r sq16][qV: r*ceil(C/2)][sV: r sq16][mV: r sq16];
    row j of qU/qV is component j, nibbles LSB-first along N/C, zero-padded to a whole byte.
    x_hat = (qU * sU + mU)^T @ (qV * sV + mV) in fp32.
    """

    def __init__(self, rank: int, iters: int = DEFAULT_ITERS, seed: int = LOWRANK_SEED):
        super().__init__(rank, iters, seed)
        self.spec = f"lowrank-int4:{self.rank}"

    def encoded_nbytes(self, n: int, c: int) -> int:
        r = self.effective_rank(n, c)
        return r * (packed_len(n, 4) + packed_len(c, 4)) + 8 * r

    @staticmethod
    def _quantise_rows(m: torch.Tensor):
        """Per-row int4 of an (r, L) fp32 matrix -> (packed bytes, sq16 scale, sq16 min).

        Each row's range is shrunk toward its mean by the factor in CLIP_RATIOS that minimises
        that row's squared error (clipping a few outliers buys a finer grid for the bulk); all
        candidates are evaluated at once on the small factor matrices.
        """
        r, length = m.shape
        mn, mx = m.amin(1), m.amax(1)
        mu = m.mean(1)
        rho = torch.tensor(CLIP_RATIOS, device=m.device, dtype=torch.float32)[:, None]  # (K, 1)
        s16, m16, s32, m32 = affine_params(mu + rho * (mn - mu), mu + rho * (mx - mu), 4)  # (K, r)
        k = len(CLIP_RATIOS)
        fields = torch.empty(k, r, length, dtype=torch.uint8, device=m.device)
        affine_fields(m.expand(k, r, length), s32[..., None], m32[..., None], 4, fields)
        deq = affine_levels(fields.to(torch.float32), s32[..., None], m32[..., None])
        best = (deq - m).square_().sum(2).argmin(0)  # (r,)
        rows = torch.arange(r, device=m.device)
        buf, view = field_buffer(r, length, 4, m.device)
        view.copy_(fields[best, rows])
        return pack_fields(buf, 4), s16[best, rows], m16[best, rows]

    def encode(self, x: torch.Tensor, state: CodecState | None = None) -> torch.Tensor:
        _, u, v, _ = self._factorise(x, state)
        qu, su, mu = self._quantise_rows(u.mT.contiguous())
        qv, sv, mv = self._quantise_rows(v.contiguous())
        return concat_bytes([qu, su, mu, qv, sv, mv])

    def decode(self, payload: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, c = self._check_decode_args(payload, shape, dtype)
        r = self.effective_rank(n, c)
        pn, pc = packed_len(n, 4), packed_len(c, 4)
        parts = split_bytes(payload, [r * pn, 2 * r, 2 * r, r * pc, 2 * r, 2 * r])
        values = torch.arange(16, dtype=torch.float32, device=payload.device)

        def rows(qb, sb, mb, length, p):
            s = _sq16(sb, r)[:, None]
            m = _sq16(mb, r)[:, None]
            return affine_levels(lut_decode(qb.view(r, p), 4, values, length), s, m)

        ud = rows(parts[0], parts[1], parts[2], n, pn)
        vd = rows(parts[3], parts[4], parts[5], c, pc)
        return finish(ud.mT @ vd, dtype)


def _sq16(buf: torch.Tensor, k: int) -> torch.Tensor:
    return sq16_decode(bytes_as(buf, torch.float16, (k,)))
