"""Per-stream residual coding: base, error feedback, warmup, order 0/1/2, and the compression plan."""
from .coder import NonFiniteError, ResidualDecoder, ResidualEncoder, StreamState, payload_nbytes
from .config import NONE, PRESETS, WARMUP, CompressionConfig, layer_plan

__all__ = ["CompressionConfig", "ResidualEncoder", "ResidualDecoder", "StreamState", "NonFiniteError",
           "payload_nbytes", "layer_plan", "PRESETS", "WARMUP", "NONE"]
