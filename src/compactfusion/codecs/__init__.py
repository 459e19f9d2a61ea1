"""Codecs: pure functions between an (N, C) float tensor and the exact bytes on the wire.

    codec = get_codec("binary")
    payload = codec.encode(x)                       # 1-D uint8 on x.device
    x_hat = codec.decode(payload, (N, C), x.dtype)  # (N, C) on payload.device
    assert payload.numel() == codec.encoded_nbytes(N, C)

No header: sizes derive from (N, C, spec) on both sides. Formats: docs/wire-formats.md.
This package imports nothing from other compactfusion subpackages.
"""
from .base import Codec, CodecState
from .registry import CODEC_SPECS, VALID_SPECS_TEXT, WIRE_FORMAT_VERSION, get_codec, parse_codec_spec

__all__ = [
    "CODEC_SPECS",
    "Codec",
    "CodecState",
    "VALID_SPECS_TEXT",
    "WIRE_FORMAT_VERSION",
    "get_codec",
    "parse_codec_spec",
]
