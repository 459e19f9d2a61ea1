"""Raw element casts: ``fp16``/``bf16`` (lossy, saturating) and lossless ``fp32``/``raw:<dtype>``."""
from __future__ import annotations

import torch

from .base import Codec, CodecState
from .numeric import FP16_MAX
from .packing import as_bytes, bytes_as

#: Wire dtype -> input dtypes it carries exactly (lossless codecs refuse anything else).
EXACT_FROM = {
    torch.float64: (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    torch.float32: (torch.float16, torch.bfloat16, torch.float32),
    torch.float16: (torch.float16,),
    torch.bfloat16: (torch.bfloat16,),
}


class RawCodec(Codec):
    """N*C elements of ``wire_dtype``, row-major, little-endian.

    Payloads never alias the input and decoded tensors never alias the payload, so callers may
    mutate either afterwards (e.g. while an async send is still reading the payload).
    """

    def __init__(self, spec: str, wire_dtype: torch.dtype, lossless: bool):
        self.spec = spec
        self.wire_dtype = wire_dtype
        self.lossless = lossless
        self._itemsize = torch.empty((), dtype=wire_dtype).element_size()

    def encoded_nbytes(self, n: int, c: int) -> int:
        return n * c * self._itemsize

    def encode(self, x: torch.Tensor, state: CodecState | None = None) -> torch.Tensor:
        self._check_input(x)
        if self.lossless and x.dtype not in EXACT_FROM[self.wire_dtype]:
            raise ValueError(
                f"codec {self.spec} is lossless and cannot carry {x.dtype} exactly; "
                f"use a raw:<dtype> at least as wide as the input, or the lossy fp16/bf16 casts"
            )
        # The fp32 sum is a read-only pass; NaN/Inf propagate into it.
        self._check_finite(x, probe=torch.sum(x, dtype=torch.float32))
        if x.dtype == self.wire_dtype:
            w = x.clone(memory_format=torch.contiguous_format)
        else:
            w = x.to(self.wire_dtype, memory_format=torch.contiguous_format)
            if not self.lossless:
                # Finite inputs beyond the wire range saturate rather than becoming Inf.
                big = FP16_MAX if self.wire_dtype == torch.float16 else torch.finfo(self.wire_dtype).max
                torch.nan_to_num_(w, posinf=big, neginf=-big)
        return as_bytes(w)

    def decode(self, payload: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, c = self._check_decode_args(payload, shape, dtype)
        w = bytes_as(payload, self.wire_dtype, (n, c))
        if dtype == self.wire_dtype:
            return w.clone()
        out = w.to(dtype)
        if dtype == torch.float16:
            torch.nan_to_num_(out, posinf=FP16_MAX, neginf=-FP16_MAX)
        return out
