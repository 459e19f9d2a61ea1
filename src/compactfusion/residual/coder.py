"""Residual coding with error feedback: the sender/receiver mirror pair (CompactFusion Sec. 3).

Each *stream* (one tensor one rank sends to others at every step for one call site, e.g.
``(layer, "k", src_rank)``) has a ``StreamState`` on the sender and on every receiver. Both sides run the
same function, ``_reconstruct``, on the same payload with the same arithmetic (float32, fixed op order),
so their states stay **bitwise identical** on the same device type; that is what makes error feedback
cancel coding errors instead of letting them drift.

Per step t, with base b = x̂_{t-1} and, for order 2, the last reconstructed step delta Δ̂_{t-1}:
  order 0: send C(x_t);                           x̂_t = D(C(x_t))
  order 1: send C(x_t - b);                       x̂_t = b + D(C(x_t - b))
  order 2: p = b + γ Δ̂_{t-1}; send C(x_t - p);    x̂_t = p + D(C(x_t - p)),  Δ̂_t = x̂_t - b
With error feedback both sides set b := x̂_t. Without it (order 1 ablation) the sender keeps b := x_t, so
x_t - x̂_t becomes the sum of all past coding errors. Warmup (and "none") steps send x_t losslessly and
set b := x_t on both sides; with ``warmup_codec`` (e.g. "int8") warmup steps are coded like any other step
(step 0 sends C(x_0) against a zero prediction), so error feedback runs from step 0.

Non-finite policy: NaN/Inf entries of x are replaced by the stream's prediction before coding (so a
cache is never poisoned) and counted per stream; with ``on_nonfinite="raise"`` a ``NonFiniteError`` is
raised instead. Reconstructions are clamped into the state dtype's finite range on both sides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from ..codecs import CodecState, get_codec
from .config import AUTO, NONE, WARMUP, CompressionConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NonFiniteError(ValueError):
    """An activation with NaN/Inf reached a stream whose policy is ``on_nonfinite="raise"``."""


@dataclass
class StreamState:
    base: torch.Tensor | None = None   # x̂_{t-1}, stored in the state dtype
    delta: torch.Tensor | None = None  # Δ̂_{t-1} (order 2 only)
    gamma: float | None = None  # order 2 with delta_decay="auto": gamma estimated from Δ̂_{t-1}, Δ̂_{t-2}
    last_step: int = -1
    codec_state: CodecState = field(default_factory=CodecState)  # sender-only scratch (low-rank warm start)
    sends: int = 0
    nonfinite_events: int = 0

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in (self.base, self.delta) if t is not None)
        return n + self.codec_state.nbytes()

    def checksum(self) -> int:
        """Cheap order-sensitive digest of the reconstruction state, for cross-rank consistency checks."""
        total = 0
        for t in (self.base, self.delta):
            if t is None:
                continue
            flat = t.detach().contiguous().view(-1)
            ints = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32).to(torch.int64)
            weights = torch.arange(ints.numel(), device=ints.device, dtype=torch.int64) % 65521 + 1
            total = (total * 1_000_003 + int((ints * weights).sum().item())) % (1 << 61)
        return total


def _layer_of(key: Hashable) -> int:
    if isinstance(key, tuple) and key and isinstance(key[0], int) and not isinstance(key[0], bool):
        return key[0]
    return 0


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (N tokens, C channels), got shape {tuple(x.shape)}; flatten leading dims first")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); there is nothing to send")


class _Coder:
    def __init__(self, config: CompressionConfig):
        if not isinstance(config, CompressionConfig):
            raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
        self.config = config
        self.streams: dict[Hashable, StreamState] = {}
        self._codecs: dict[str, object] = {}

    # -- shared helpers ------------------------------------------------------------------------
    def _codec(self, spec: str):
        if spec not in self._codecs:
            self._codecs[spec] = get_codec(spec)
        return self._codecs[spec]

    def mode(self, key: Hashable, step: int, layer: int | None = None) -> str:
        """What the plan sends for this stream at this step: a codec spec, "warmup" or "none"."""
        return self.config.spec_for(_layer_of(key) if layer is None else layer, step)

    def _state(self, key: Hashable, step: int) -> StreamState:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        st = self.streams.get(key)
        if st is None:
            st = self.streams[key] = StreamState()
        elif step < st.last_step:
            raise ValueError(f"stream {key!r} got step {step} after step {st.last_step}; call reset() "
                             f"between generations")
        return st

    def _state_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        return _DTYPES[self.config.state_dtype] if self.config.state_dtype else x_dtype

    def _prediction(self, st: StreamState, like: torch.Tensor) -> torch.Tensor:
        """float32 prediction of x_t from the state (zeros for a fresh stream)."""
        cfg = self.config
        if st.base is None or cfg.residual_order == 0:
            return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        pred = st.base.float()
        if cfg.residual_order == 2 and st.delta is not None:
            gamma = cfg.delta_decay if cfg.delta_decay != AUTO else st.gamma
            if gamma:  # auto: no estimate before two reconstructed deltas exist
                pred = pred + gamma * st.delta.float()
        return pred

    def _store(self, st: StreamState, x_hat32: torch.Tensor, state_dtype: torch.dtype) -> None:
        """Commit x̂_t as the new base (and Δ̂_t for order 2), clamped into the state dtype's finite range."""
        fin = torch.finfo(state_dtype)
        new_base = x_hat32.clamp(fin.min, fin.max).nan_to_num(0.0).to(state_dtype)
        if self.config.residual_order == 2:
            new_delta = None if st.base is None else (new_base.float() - st.base.float()).to(state_dtype)
            if self.config.delta_decay == AUTO and new_delta is not None and st.delta is not None:
                st.gamma = auto_gamma(new_delta, st.delta)
            st.delta = new_delta
        if self.config.residual_order > 0:
            st.base = new_base

    def _reconstruct(self, st: StreamState, spec: str, payload: torch.Tensor, shape, dtype, state_dtype,
                     true_x: torch.Tensor | None = None) -> torch.Tensor:
        """Identical on sender and receiver: decode, add the prediction, update the state. Returns x̂_t."""
        wire = self.config.wire_spec(spec, dtype)
        if _lossless_raw(spec, self.config):
            x_hat32 = self._codec(wire).decode(payload, shape, dtype).float()
        else:  # coded steps, and warmup steps with a lossy warmup_codec (prediction 0 on a fresh stream)
            pred = self._prediction(st, payload.new_empty(shape, dtype=torch.float32))
            # pred + D(payload); fused codecs add in their decode pass (same bits: codecs/fused)
            x_hat32 = self._codec(wire).decode_add(payload, shape, pred)
        self._store(st, x_hat32, state_dtype)
        if true_x is not None and self.config.residual_order == 1 and not self.config.error_feedback:
            st.base = true_x.to(state_dtype)  # the drifting ablation: the sender forgets its coding error
        st.sends += 1
        # Return the float32 reconstruction (not the possibly lower-precision stored base): same on both sides.
        fin = torch.finfo(dtype)
        return x_hat32.clamp(fin.min, fin.max).nan_to_num(0.0).to(dtype)

    # -- lifecycle -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every stream (a new generation)."""
        self.streams.clear()

    def state_nbytes(self) -> int:
        return sum(st.nbytes() for st in self.streams.values())

    def checksums(self) -> dict:
        return {key: st.checksum() for key, st in self.streams.items()}

    def nonfinite_events(self) -> int:
        return sum(st.nonfinite_events for st in self.streams.values())


class ResidualEncoder(_Coder):
    """Sender side. ``encode(key, x, step)`` -> the exact wire bytes (1-D uint8)."""

    def encode(self, key: Hashable, x: torch.Tensor, step: int, layer: int | None = None) -> torch.Tensor:
        payload, _ = self.encode_with_reconstruction(key, x, step, layer)
        return payload

    def encode_with_reconstruction(self, key: Hashable, x: torch.Tensor, step: int, layer: int | None = None):
        """Like ``encode`` but also returns x̂_t, bitwise equal to what every receiver reconstructs."""
        _check_x(x)
        st = self._state(key, step)
        spec = self.mode(key, step, layer)
        state_dtype = self._state_dtype(x.dtype)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            if self.config.on_nonfinite == "raise":
                raise NonFiniteError(f"stream {key!r} at step {step}: activation has {bad} NaN/Inf values")
            st.nonfinite_events += 1
            fallback = self._prediction(st, x) if st.base is not None else torch.zeros_like(x, dtype=torch.float32)
            x = torch.where(torch.isfinite(x), x, fallback.to(x.dtype))
            # an Inf-free x may still overflow a low-precision dtype; nan_to_num keeps it finite
            x = x.nan_to_num(0.0, torch.finfo(x.dtype).max, torch.finfo(x.dtype).min)
        wire = self.config.wire_spec(spec, x.dtype)
        if _lossless_raw(spec, self.config):
            payload = self._codec(wire).encode(x)
        else:
            # E(x.float() - pred); fused codecs subtract inside their kernels (same bytes: codecs/fused)
            payload = self._codec(wire).encode_residual(x, self._prediction(st, x), state=st.codec_state)
        x_hat = self._reconstruct(st, spec, payload, tuple(x.shape), x.dtype, state_dtype, true_x=x)
        st.last_step = step
        return payload, x_hat


class ResidualDecoder(_Coder):
    """Receiver side. ``decode(key, payload, step, (N, C), dtype)`` -> x̂_t of shape (N, C)."""

    def decode(self, key: Hashable, payload: torch.Tensor, step: int, shape, dtype: torch.dtype = torch.float32,
               layer: int | None = None) -> torch.Tensor:
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.ndim != 1:
            raise TypeError("payload must be a 1-D torch.uint8 tensor as produced by ResidualEncoder.encode")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"shape must be (N, C) with N, C > 0, got {shape}")
        st = self._state(key, step)
        spec = self.mode(key, step, layer)
        expected = self.expected_nbytes(spec, shape, dtype)
        if payload.numel() != expected:
            raise ValueError(f"stream {key!r} at step {step}: payload has {payload.numel()} bytes but {spec!r} for "
                             f"shape {shape} needs {expected}; sender and receiver disagree on the plan or shape")
        x_hat = self._reconstruct(st, spec, payload, shape, dtype, self._state_dtype(dtype))
        st.last_step = step
        return x_hat

    def expected_nbytes(self, spec: str, shape, dtype: torch.dtype) -> int:
        return self._codec(self.config.wire_spec(spec, dtype)).encoded_nbytes(*shape)


def _lossless_raw(spec: str, config: CompressionConfig) -> bool:
    """Plan results sent as the raw tensor (not as a residual): "none", and "warmup" without a warmup_codec."""
    return spec == NONE or (spec == WARMUP and config.warmup_codec is None)


def auto_gamma(delta: torch.Tensor, prev: torch.Tensor) -> float:
    """Least-squares gamma of ``delta`` on ``prev``, clamped to [0, 1] and rounded to a multiple of 1/1024.

    Both sides call this on bitwise-identical tensors. The dot products run in float64, whose reduction
    order may differ with the thread count by ~1e-16 relative; rounding to the 1/1024 grid makes the two
    sides' gammas identical unless a value lands within ~1e-13 of a grid midpoint.
    """
    d, p = delta.double().reshape(-1), prev.double().reshape(-1)
    den = float(torch.dot(p, p))
    if not den > 0.0:
        return 0.0
    g = min(1.0, max(0.0, float(torch.dot(d, p)) / den))
    return round(g * 1024) / 1024


def payload_nbytes(config: CompressionConfig, layer: int, step: int, shape, dtype: torch.dtype) -> int:
    """Bytes a stream of ``shape``/``dtype`` sends at (layer, step) — known to every rank without communication."""
    spec = config.spec_for(layer, step)
    return get_codec(config.wire_spec(spec, dtype)).encoded_nbytes(*shape)
