"""Turning attention tensors into wire bytes and back, one residual stream per (call site, sender[, receiver]).

Every strategy goes through :class:`StreamCoder`, so "which tensors are compressed", "what a payload
weighs" and "what a payload decodes to" are decided in one place, identically on every rank:

* a tensor listed in ``tensors`` is residual-coded (``ResidualEncoder``/``ResidualDecoder``: warmup steps
  travel losslessly and initialise the state, later steps send C(x - base) with error feedback);
* any other tensor travels as its raw bytes.

``wire_nbytes`` depends only on (tensor, layer, step, shape, dtype), so every rank knows the size of every
payload it will receive without asking.
"""
from __future__ import annotations

from typing import Hashable

import torch

from ..residual import CompressionConfig, ResidualDecoder, ResidualEncoder, payload_nbytes
from ..residual.config import WARMUP

__all__ = ["StreamCoder", "to_bytes", "from_bytes", "split_bytes"]


def to_bytes(x: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``x`` (row-major) as a 1-D uint8 tensor."""
    return x.contiguous().view(-1).view(torch.uint8)


def from_bytes(payload: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_bytes`; copies when ``payload`` is not aligned for ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    if payload.storage_offset() % size:
        payload = payload.clone()
    return payload.view(dtype).reshape(shape)


def split_bytes(buf: torch.Tensor, sizes) -> list[torch.Tensor]:
    """Split a concatenation of payloads back into its parts (views)."""
    if buf.numel() != sum(sizes):
        raise ValueError(f"received {buf.numel()} bytes but expected {sum(sizes)} ({list(sizes)})")
    return list(torch.split(buf, list(sizes)))


def _aligned(payload: torch.Tensor) -> torch.Tensor:
    # Codecs may reinterpret parts of a payload as wider dtypes; give them an 8-byte-aligned start.
    return payload.clone() if payload.storage_offset() % 8 else payload


class StreamCoder:
    """Encodes/decodes the attention tensors of one ``ParallelContext`` (one encoder + one decoder)."""

    def __init__(self, compression: CompressionConfig | None, tensors: tuple):
        self.compression = compression
        self.tensors = tuple(tensors) if compression is not None else ()
        self.encoder = ResidualEncoder(compression) if self.tensors else None
        self.decoder = ResidualDecoder(compression) if self.tensors else None

    def raw_layer(self, layer: int) -> bool:
        """True when the plan keeps ``layer`` uncompressed for the whole generation (``codec="auto"``'s plan has
        ``raw_layer``): its tensors then travel as raw bytes with no residual state, as in an uncompressed run.
        The plan must answer alike on every rank (auto's decisions are agreed)."""
        fn = getattr(self.compression.plan, "raw_layer", None) if self.tensors else None
        return fn is not None and bool(fn(layer))

    def coded(self, tensor: str, layer: int | None = None) -> bool:
        return tensor in self.tensors and (layer is None or not self.raw_layer(layer))

    def warmup(self, layer: int, step: int) -> bool:
        """True when this (layer, step) travels at full precision because of compression warmup."""
        return bool(self.tensors) and self.compression.spec_for(layer, step) == WARMUP and not self.raw_layer(layer)

    @staticmethod
    def _matrix_shape(shape) -> tuple[int, int]:
        b, s, h, d = shape
        return (b * s, h * d)

    def wire_nbytes(self, tensor: str, layer: int, step: int, shape, dtype: torch.dtype) -> int:
        """Bytes a (B, S, H, D) tensor of ``dtype`` occupies on the wire at (layer, step)."""
        if any(int(n) == 0 for n in shape):
            return 0
        if self.coded(tensor, layer):
            return payload_nbytes(self.compression, layer, step, self._matrix_shape(shape), dtype)
        return raw_nbytes(shape, dtype)

    def encode(self, key: Hashable, tensor: str, x: torch.Tensor, layer: int, step: int):
        """``(payload, x_hat)``: the wire bytes for ``x`` (B, S, H, D) and, bitwise, what receivers decode."""
        if x.numel() == 0:
            return x.new_empty(0, dtype=torch.uint8), x
        if not self.coded(tensor, layer):
            return to_bytes(x), x
        payload, x_hat = self.encoder.encode_with_reconstruction(key, x.reshape(self._matrix_shape(x.shape)),
                                                                 step, layer)
        return payload, x_hat.reshape(x.shape)

    def decode(self, key: Hashable, tensor: str, payload: torch.Tensor, shape, dtype: torch.dtype,
               layer: int, step: int) -> torch.Tensor:
        """The (B, S, H, D) tensor a payload stands for (updating that stream's receiver state)."""
        shape = tuple(int(n) for n in shape)
        if any(n == 0 for n in shape):
            return torch.empty(shape, dtype=dtype, device=payload.device)
        if not self.coded(tensor, layer):
            return from_bytes(payload, shape, dtype)
        x = self.decoder.decode(key, _aligned(payload), step, self._matrix_shape(shape), dtype, layer)
        return x.reshape(shape)

    # -- lifecycle ------------------------------------------------------------------------------
    def reset(self) -> None:
        for c in (self.encoder, self.decoder):
            if c is not None:
                c.reset()

    def state_nbytes(self) -> int:
        return sum(c.state_nbytes() for c in (self.encoder, self.decoder) if c is not None)

    def checksums(self) -> dict:
        """{stream key: checksum} over both sides (a rank never both sends and receives one stream)."""
        out = {}
        for c in (self.encoder, self.decoder):
            if c is not None:
                out.update(c.checksums())
        return out


def raw_nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()
