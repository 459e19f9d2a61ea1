"""The codec contract: pure functions between an (N, C) float tensor and the exact bytes on the wire.

A codec never holds per-stream state itself; state that makes a codec better over time (the
warm-started basis of the low-rank codecs) lives in a ``CodecState`` owned by the caller, one per
stream, so that every generation can drop it by dropping the residual coder that owns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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

    def __repr__(self) -> str:
        return f"<codec {self.spec}>"
