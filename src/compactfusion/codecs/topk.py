"""``topk:M``: keep the largest-|x| element of every block of M consecutive elements.

Blocks run over the row-major flattening of (N, C) (they may straddle rows); the flat tensor is
zero-padded to nb = ceil(N*C/M) blocks. Wire: [values: nb sq16][indices], where indices are the
in-block positions: 4 bits each (M <= 16), packed two per byte LSB-first (block 2i in the low
nibble, a zero nibble pads an odd nb), or one byte each (16 < M <= 256). Ties keep the first
position. Decode scatters the values into zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Codec, CodecState
from .numeric import finish, sq16_decode, sq16_encode
from .packing import bytes_as, concat_bytes, pack_fields, packed_len, split_bytes, unpack_fields

TOPK_MIN_BLOCK = 2
TOPK_MAX_BLOCK = 256


class TopKCodec(Codec):
    def __init__(self, block: int):
        block = int(block)
        if not TOPK_MIN_BLOCK <= block <= TOPK_MAX_BLOCK:
            raise ValueError(f"topk block must be in [{TOPK_MIN_BLOCK}, {TOPK_MAX_BLOCK}], got {block}")
        self.block = block
        self.spec = f"topk:{block}"
        self.index_bits = 4 if block <= 16 else 8

    def _nblocks(self, n: int, c: int) -> int:
        return -(-(n * c) // self.block)

    def _index_bytes(self, nb: int) -> int:
        return packed_len(nb, 4) if self.index_bits == 4 else nb

    def encoded_nbytes(self, n: int, c: int) -> int:
        nb = self._nblocks(n, c)
        return 2 * nb + self._index_bytes(nb)

    def encode(self, x: torch.Tensor, state: CodecState | None = None) -> torch.Tensor:
        n, c = self._check_input(x)
        nb = self._nblocks(n, c)
        flat = x.float().reshape(-1)
        if nb * self.block != flat.numel():
            flat = F.pad(flat, (0, nb * self.block - flat.numel()))
        blocks = flat.view(nb, self.block)
        # argmax of |x| picks a NaN if the block has one (torch propagates NaN in max/argmax).
        idx = blocks.abs().argmax(dim=1, keepdim=True)
        vals = blocks.gather(1, idx).squeeze(1)
        self._check_finite(x, probe=vals)
        v16 = sq16_encode(vals, "nearest")
        idx8 = idx.squeeze(1).to(torch.uint8)
        if self.index_bits == 4:
            if nb % 2:
                idx8 = F.pad(idx8, (0, 1))
            idx8 = pack_fields(idx8, 4)
        return concat_bytes([v16, idx8])

    def decode(self, payload: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, c = self._check_decode_args(payload, shape, dtype)
        nb = self._nblocks(n, c)
        vb, ib = split_bytes(payload, [2 * nb, self._index_bytes(nb)])
        vals = sq16_decode(bytes_as(vb, torch.float16, (nb,)))
        idx = unpack_fields(ib, 4, nb) if self.index_bits == 4 else ib
        out = torch.zeros(nb, self.block, dtype=torch.float32, device=payload.device)
        # Indices >= M only occur in corrupted payloads; clamping keeps the write in bounds.
        out.scatter_(1, idx.to(torch.int64).clamp_(max=self.block - 1)[:, None], vals[:, None])
        return finish(out.view(-1)[: n * c].view(n, c), dtype)
