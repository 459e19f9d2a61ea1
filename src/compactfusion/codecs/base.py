"""The codec contract: pure functions between an (N, C) float tensor and the exact bytes on the wire.

A codec never holds per-stream state itself; state that makes a codec better over time (the
warm-started basis of the low-rank codecs) lives in a ``CodecState`` owned by the caller, one per
stream, so that every generation can drop it by dropping the residual coder that owns it.

There is no header on the wire: the byte count and every split offset derive from (N, C, spec),
which sender and receiver must agree on. See docs/wire-formats.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: Input dtypes every codec accepts (lossless raw codecs narrow this further).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class CodecState:
    """Sender-side per-stream scratch state (e.g. the previous low-rank basis for warm start).

    Only the *encoder* uses it: every codec transmits all it needs, so receivers stay stateless
    and sender/receiver agreement never depends on this object.
    """

    data: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.data.values() if isinstance(v, torch.Tensor))


class Codec:
    """Base class. Subclasses set ``spec`` and implement the three methods below.

    encode(x) -> 1-D torch.uint8 tensor with exactly ``encoded_nbytes(N, C)`` elements.
    decode(payload, (N, C), dtype) -> (N, C) tensor of ``dtype`` on ``payload.device``.
    """

    spec: str = "?"
    #: True when decode(encode(x)) == x exactly (used to skip residual coding of lossless payloads).
    lossless: bool = False

    def encoded_nbytes(self, n: int, c: int) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, state: CodecState | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def encode_residual(self, x: torch.Tensor, pred: torch.Tensor, state: CodecState | None = None) -> torch.Tensor:
        """``encode(x.float() - pred, state)`` for an fp32 ``pred`` of x's shape: the residual coding
        step. Codecs with a fused encoder subtract on the fly instead of materialising the residual;
        the bytes are the same either way."""
        return self.encode(x.float() - pred, state)

    def decode_add(self, payload: torch.Tensor, shape: tuple[int, int], base: torch.Tensor) -> torch.Tensor:
        """``base + decode(payload, shape, float32)`` for an fp32 ``base``: the residual update
        (reconstruction = prediction + decoded residual). Codecs with a fused decoder do the add in
        the same pass; the bits are the same either way (one correctly rounded fp32 add)."""
        return base + self.decode(payload, shape, torch.float32)

    def __repr__(self) -> str:
        return f"<codec {self.spec}>"

    # ---- shared validation (typed exceptions, never assert: they must survive python -O) ----

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"codec {self.spec}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"codec {self.spec}: expected a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}"
            )
        if x.dim() != 2:
            raise ValueError(f"codec {self.spec}: expected a 2-D (N, C) tensor, got shape {tuple(x.shape)}")
        n, c = x.shape
        if n == 0 or c == 0:
            raise ValueError(f"codec {self.spec}: cannot encode an empty tensor of shape ({n}, {c})")
        return int(n), int(c)

    def _check_finite(self, x: torch.Tensor, probe: torch.Tensor | None = None) -> bool:
        """Raise ValueError if ``x`` holds NaN/Inf; return False if ``probe`` overflowed on finite x.

        ``probe`` is a reduction the codec computes anyway (sum of |x|, min+max, ...): NaN and Inf
        propagate into it, so a finite probe proves a finite input without an extra pass. Only a
        non-finite probe (NaN/Inf in x, or a sum that overflowed on huge finite data) pays for the
        exact count. One device sync per call is the price of raising on bad input.
        """
        if probe is not None and bool(torch.isfinite(probe).all()):
            return True
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        if n_nan or n_inf:
            parts = []
            if n_nan:
                parts.append(f"contains NaN ({n_nan} of {x.numel()} elements)")
            if n_inf:
                parts.append(f"contains Inf ({n_inf} of {x.numel()} elements)")
            raise ValueError(f"codec {self.spec}: input " + " and ".join(parts))
        return probe is None

    def _check_decode_args(self, payload: torch.Tensor, shape, dtype) -> tuple[int, int]:
        if not isinstance(payload, torch.Tensor):
            raise TypeError(f"codec {self.spec}: payload must be a torch.Tensor, got {type(payload).__name__}")
        if payload.dtype != torch.uint8:
            raise TypeError(f"codec {self.spec}: payload must be torch.uint8, got {payload.dtype}")
        if payload.dim() != 1:
            raise ValueError(f"codec {self.spec}: payload must be 1-D, got shape {tuple(payload.shape)}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"codec {self.spec}: output dtype must be a float dtype, got {dtype}")
        try:
            n, c = (int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"codec {self.spec}: shape must be (N, C), got {shape!r}") from None
        if n <= 0 or c <= 0:
            raise ValueError(f"codec {self.spec}: shape must be positive, got ({n}, {c})")
        want = self.encoded_nbytes(n, c)
        if payload.numel() != want:
            raise ValueError(
                f"codec {self.spec}: payload has {payload.numel()} bytes, expected {want} for shape ({n}, {c})"
            )
        return n, c
