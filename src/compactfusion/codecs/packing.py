"""Bit-field packing and byte (de)serialisation shared by the codecs.

Wire convention for every sub-byte field: fields are packed along the last dimension, LSB-first
(field i of a byte sits at bit ``bits*i``), each row padded with zero fields to a whole byte.
"""
from __future__ import annotations

import sys

import torch

_LITTLE_ENDIAN = sys.byteorder == "little"
_SUPPORTED_BITS = (1, 2, 4)


def packed_len(length: int, bits: int) -> int:
    """Bytes needed for ``length`` fields of ``bits`` bits (row padded to a whole byte)."""
    per = 8 // bits
    return -(-length // per)


def field_buffer(rows: int, length: int, bits: int, device, dtype=torch.uint8) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, padded_length) buffer with zeroed pad columns, and its (rows, length) view to fill.

    Writing fields straight into the padded buffer avoids a pad copy of the whole tensor.
    """
    padded = packed_len(length, bits) * (8 // bits)
    buf = torch.empty(rows, padded, dtype=dtype, device=device)
    if padded != length:
        buf[:, length:] = 0
    return buf, buf[:, :length]


def pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (..., L) uint8/bool fields (values < 2**bits, L a multiple of 8//bits) into (..., L*bits//8) uint8.

    Little-endian hosts reinterpret groups of source bytes as one wide integer and gather the
    fields with a multiply-shift or a shift-or fold: one or two passes over the packed size
    instead of 8//bits strided passes. Integer overflow in the multiply wraps by design (only
    the top byte is kept); tests compare against the portable path.
    """
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_SUPPORTED_BITS}, got {bits}")
    per = 8 // bits
    if fields.shape[-1] % per:
        raise ValueError(f"last dimension {fields.shape[-1]} is not a multiple of {per}")
    out_shape = (*fields.shape[:-1], fields.shape[-1] // per)
    f = fields.contiguous()
    if f.dtype == torch.bool:
        f = f.view(torch.uint8)
    if not _LITTLE_ENDIAN:
        return pack_fields_portable(f, bits)
    flat = f.reshape(-1)
    if bits == 1:
        v = flat.view(torch.int64)  # 8 one-bit fields, one per byte, at bit 8i
        packed = (v * 0x0102040810204080).bitwise_right_shift_(56)  # bit 8i -> 56+i; wraps mod 2**64
    elif bits == 2:
        v = flat.view(torch.int32)  # 4 two-bit fields at bit 8i
        packed = (v * 0x01041040).bitwise_right_shift_(24)  # field at 8i -> bit 24+2i; wraps mod 2**32
    else:
        v = flat.view(torch.int16)  # 2 nibbles at bits 0 and 8; no overflow possible
        packed = v | (v >> 4)
    # int -> uint8 conversion is modular (C++ unsigned narrowing), which keeps exactly the low byte.
    return packed.to(torch.uint8).view(out_shape)


def pack_fields_portable(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Endianness-independent reference implementation of :func:`pack_fields`."""
    per = 8 // bits
    f = fields.to(torch.uint8)
    grouped = f.reshape(*f.shape[:-1], f.shape[-1] // per, per)
    acc = grouped[..., 0].clone()
    for i in range(1, per):  # loops over bit positions (<= 8), not elements
        acc |= grouped[..., i] << (bits * i)
    return acc


def unpack_fields(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: (..., P) uint8 -> (..., length) uint8 (pad fields dropped)."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    out = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    out = out.reshape(*packed.shape[:-1], packed.shape[-1] * per)
    return out if out.shape[-1] == length else out[..., :length]


def field_lut(bits: int, values: torch.Tensor) -> torch.Tensor:
    """(256, 8//bits) float table: row b holds ``values[field_i(b)]`` for every field of byte b."""
    per = 8 // bits
    b = torch.arange(256, device=values.device, dtype=torch.int64)
    shifts = torch.arange(0, 8, bits, device=values.device, dtype=torch.int64)
    idx = (b[:, None] >> shifts) & ((1 << bits) - 1)
    return values[idx].reshape(256, per)


def lut_decode(packed: torch.Tensor, bits: int, values: torch.Tensor, length: int) -> torch.Tensor:
    """(rows, P) packed fields -> (rows, length) float ``values[field]`` (a view when padded).

    On CPU one ``embedding`` gather over a 256-row byte table unpacks and maps all fields of a
    byte at once. CUDA's gather is slow for such short rows, so accelerators unpack with shifts
    and index the small table instead. Both yield the exact table values.
    """
    if packed.device.type != "cpu":
        return lut_decode_unpacked(packed, bits, values, length)
    rows, p = packed.shape
    out = torch.nn.functional.embedding(packed.to(torch.int32), field_lut(bits, values))
    out = out.view(rows, p * (8 // bits))
    return out if out.shape[1] == length else out[:, :length]


def lut_decode_unpacked(packed: torch.Tensor, bits: int, values: torch.Tensor, length: int) -> torch.Tensor:
    """The accelerator path of :func:`lut_decode` (any device)."""
    return values[unpack_fields(packed, bits, length).to(torch.int64)]


# ---- byte (de)serialisation -----------------------------------------------------------------


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Row-major bytes of ``t`` as a flat uint8 tensor (little-endian element encoding)."""
    t = t.contiguous()
    if t.dtype == torch.uint8:
        return t.reshape(-1)
    return t.reshape(-1).view(torch.uint8)


def concat_bytes(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([as_bytes(p) for p in parts])


def split_bytes(payload: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive slices of ``payload``; the sizes must sum to its length (checked by the caller)."""
    out, o = [], 0
    for s in sizes:
        out.append(payload[o : o + s])
        o += s
    return out


def bytes_as(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Reinterpret a uint8 slice as ``dtype``; copies first when the slice is misaligned for it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if buf.storage_offset() % itemsize or buf.data_ptr() % itemsize or not buf.is_contiguous():
        buf = buf.clone()
    return buf.view(dtype).view(shape)
