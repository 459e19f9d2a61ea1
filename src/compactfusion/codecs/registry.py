"""Codec spec strings -> codec instances. Nothing is cached: construction is cheap and codecs are
stateless, so every call returns a fresh object."""
from __future__ import annotations

import re

import torch

from .affine import AffineCodec
from .base import Codec
from .fused import check_impl
from .budget import BudgetLowRankInt4Codec, parse_budget
from .lowrank import LowRankCodec, LowRankInt4Codec
from .raw import RawCodec
from .sign import BinaryCodec, Int2Codec
from .topk import TOPK_MAX_BLOCK, TOPK_MIN_BLOCK, TopKCodec

MAX_RANK = 1024
#: Bumped whenever any codec's byte layout or reconstruction arithmetic changes. Payloads carry no
#: header, so peers that may run different builds should compare this out of band.
WIRE_FORMAT_VERSION = 1

#: Example specs, one per family (the parametrised families accept any valid parameter).
CODEC_SPECS: tuple[str, ...] = (
    "fp16",
    "bf16",
    "fp32",
    "raw:float32",
    "int8",
    "int4",
    "int2",
    "binary",
    "lowrank:8",
    "lowrank-int4:32",
    "lowrank-int4-bpe:1.0",
    "topk:16",
)

_RAW_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_RAW_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
_PLAIN = ("fp16", "bf16", "fp32", "int8", "int4", "int2", "binary")
_INT = re.compile(r"[1-9][0-9]*\Z")

VALID_SPECS_TEXT = (
    "fp16, bf16, fp32, raw:<float16|bfloat16|float32|float64>, int8, int4, int2, binary, "
    f"lowrank:<R>, lowrank-int4:<R> (1 <= R <= {MAX_RANK}), lowrank-int4-bpe:<bits per element, e.g. 1.0>, topk:<M> ({TOPK_MIN_BLOCK} <= M <= {TOPK_MAX_BLOCK})"
)


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"invalid codec spec {spec!r}: {why}; valid specs: {VALID_SPECS_TEXT}")


def parse_codec_spec(spec: str) -> tuple[str, int | str | None]:
    """Split and validate a spec: ("binary", None), ("lowrank", 8), ("raw", "float32"), ...

    Raises TypeError for a non-str, ValueError (listing the valid specs) for anything unknown.
    """
    if not isinstance(spec, str):
        raise TypeError(f"codec spec must be a str, got {type(spec).__name__}")
    if spec in _PLAIN:
        return spec, None
    family, sep, arg = spec.partition(":")
    if not sep:
        raise _bad(spec, "unknown codec")
    if family == "raw":
        name = _RAW_ALIASES.get(arg, arg)
        if name not in _RAW_DTYPES:
            raise _bad(spec, f"unknown raw dtype {arg!r}")
        return "raw", name
    if family == "lowrank-int4-bpe":
        try:
            parse_budget(arg)
        except ValueError as e:
            raise _bad(spec, str(e)) from None
        return family, arg
    if family in ("lowrank", "lowrank-int4", "topk"):
        if not _INT.match(arg):
            raise _bad(spec, f"parameter {arg!r} is not a positive integer")
        value = int(arg)
        lo, hi = (1, MAX_RANK) if family != "topk" else (TOPK_MIN_BLOCK, TOPK_MAX_BLOCK)
        if not lo <= value <= hi:
            raise _bad(spec, f"parameter {value} is outside [{lo}, {hi}]")
        return family, value
    raise _bad(spec, "unknown codec")


def get_codec(spec: str, impl: str = "auto") -> Codec:
    """A fresh codec for ``spec`` (see CODEC_SPECS and docs/wire-formats.md).

    ``impl`` picks the implementation of ``binary``/``int2`` (auto, reference, fused, triton; see
    codecs/fused); every implementation puts the same bytes on the wire. Other codecs have only
    the PyTorch implementation and accept any valid ``impl``.
    """
    family, param = parse_codec_spec(spec)
    check_impl(impl)
    if family == "fp16":
        return RawCodec("fp16", torch.float16, lossless=False)
    if family == "bf16":
        return RawCodec("bf16", torch.bfloat16, lossless=False)
    if family == "fp32":
        return RawCodec("fp32", torch.float32, lossless=True)
    if family == "raw":
        return RawCodec(f"raw:{param}", _RAW_DTYPES[param], lossless=True)
    if family == "int8":
        return AffineCodec(8)
    if family == "int4":
        return AffineCodec(4)
    if family == "int2":
        return Int2Codec(impl)
    if family == "binary":
        return BinaryCodec(impl)
    if family == "lowrank":
        return LowRankCodec(param)
    if family == "lowrank-int4":
        return LowRankInt4Codec(param)
    if family == "lowrank-int4-bpe":
        return BudgetLowRankInt4Codec(param, MAX_RANK)
    return TopKCodec(param)
