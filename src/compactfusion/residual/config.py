"""``CompressionConfig``: what every stream sends at every (layer, step), validated at construction."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Union

from ..codecs import get_codec

#: Plan results that are not codec specs. ``"warmup"`` and ``"none"`` both send the tensor losslessly
#: in its own dtype and (re)initialise the stream state on both sides; ``"warmup"`` marks the steps
#: that the ledger reports separately.
WARMUP = "warmup"
NONE = "none"

PlanFn = Callable[[int, int], str]

#: Named presets (the codec after the warmup steps). Each is a uniform plan over layers.
PRESETS = ("none", "binary", "int2", "int4", "int8", "lowrank:8", "lowrank-int4:32", "topk:16")

_ORDERS = (0, 1, 2)
_STATE_DTYPES = (None, "float32", "float16", "bfloat16")
_NONFINITE = ("sanitize", "raise")
#: ``delta_decay`` value asking for the per-stream closed-loop estimate of gamma.
AUTO = "auto"


def _check_spec(spec: str, what: str) -> None:
    if spec in (WARMUP, NONE):
        return
    try:
        get_codec(spec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}: {e}") from None


@dataclass(frozen=True)
class CompressionConfig:
    """How activations are coded on the wire (CompactFusion, Luo et al., NeurIPS 2025, Sec. 3).

    codec: codec spec used after the warmup steps ("binary", "int2", "int4", "int8", "lowrank:8",
        "lowrank-int4:32", "topk:16", "fp16", "bf16", ...), or "none" for uncompressed communication.
    residual_order: 0 sends C(x) (the naive ablation); 1 sends C(x - base); 2 sends the miss of the linear
        extrapolation base + delta_decay * (last reconstructed step delta).
    error_feedback: both sides set base := reconstruction, so the previous step's coding error is re-sent in
        the next residual and never accumulates. Off (order 1 only) is the drifting ablation.
    warmup_steps: the first steps initialise state on both sides; by default they send full precision.
    warmup_codec: None (default) sends warmup steps losslessly in the activation dtype. A codec spec (e.g.
        "int8", "int4") codes them lossily *with error feedback from step 0*: step 0 sends C(x_0) and both
        sides set base := D(C(x_0)); later warmup steps send C(x_t - prediction) like coded steps, so the
        warmup coding error is re-sent by the next step instead of persisting.
    delta_decay: gamma of order 2, a number in [0, 1], or "auto": each stream re-estimates gamma every step
        from its own reconstructed deltas (least squares of Δ̂_{t-1} on Δ̂_{t-2}, clamped to [0, 1]); both
        sides hold the same deltas, so they compute the same gamma without extra bytes.
    plan: optional callable (layer, step) -> codec spec | "warmup" | "none" overriding the uniform schedule.
        It must be deterministic and identical on every rank.
    tensors: which attention tensors are compressed ("q", "k", "v", "o"; "hidden" = pipefusion's stage-boundary
        activations); None = the strategy's default
        (K/V for all-gather and ring strategies, Q/K/V/O for Ulysses).
    state_dtype: storage dtype of the per-stream bases (None = the activation dtype); e.g. "bfloat16" halves
        the state memory of fp32 models.
    on_nonfinite: "sanitize" replaces NaN/Inf entries by the stream's prediction before coding (so no cache
        is ever poisoned) and counts the event; "raise" raises instead.
    """

    codec: str = "binary"
    residual_order: int = 1
    error_feedback: bool = True
    warmup_steps: int = 1
    delta_decay: Union[float, str] = 0.5
    plan: Union[PlanFn, None] = field(default=None, compare=False)
    tensors: Union[tuple, None] = None
    state_dtype: Union[str, None] = None
    on_nonfinite: str = "sanitize"
    warmup_codec: Union[str, None] = None

    def __post_init__(self):
        if not isinstance(self.codec, str):
            raise TypeError(f"codec must be a string spec such as 'binary' or 'lowrank:8', got {type(self.codec).__name__}")
        _check_spec(self.codec, "CompressionConfig.codec")
        if isinstance(self.residual_order, bool) or self.residual_order not in _ORDERS:
            raise ValueError(f"residual_order must be 0, 1 or 2, got {self.residual_order!r}")
        if not isinstance(self.error_feedback, bool):
            raise TypeError(f"error_feedback must be True or False, got {self.error_feedback!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.delta_decay != AUTO and (isinstance(self.delta_decay, bool) or not isinstance(self.delta_decay, (int, float))
                                         or not 0.0 <= self.delta_decay <= 1.0):
            raise ValueError(f"delta_decay must be a number in [0, 1] or 'auto', got {self.delta_decay!r}")
        if self.warmup_codec is not None:
            if not isinstance(self.warmup_codec, str):
                raise TypeError(f"warmup_codec must be None (lossless warmup) or a codec spec such as 'int8', got "
                                f"{type(self.warmup_codec).__name__}")
            if self.warmup_codec in (WARMUP, NONE):
                raise ValueError(f"warmup_codec must be None (lossless warmup) or a codec spec such as 'int8', got "
                                 f"{self.warmup_codec!r}")
            _check_spec(self.warmup_codec, "CompressionConfig.warmup_codec")
        if self.residual_order == 0 and self.error_feedback and self.compresses:
            raise ValueError("error_feedback needs a residual (residual_order 1 or 2); with residual_order=0 set "
                             "error_feedback=False")
        if self.residual_order == 2 and not self.error_feedback:
            raise ValueError("residual_order=2 requires error_feedback=True (without it sender and receiver "
                             "predictions diverge); use residual_order=1 for the no-error-feedback ablation")
        if self.plan is not None and not callable(self.plan):
            raise TypeError("plan must be a callable (layer, step) -> codec spec, or None")
        if self.tensors is not None:
            t = tuple(self.tensors)
            if not t or any(x not in ("q", "k", "v", "o", "hidden") for x in t):
                raise ValueError(f"tensors must be a non-empty subset of ('q', 'k', 'v', 'o') (attention tensors) or "
                                 f"('hidden',) (pipefusion stage activations), got {self.tensors!r}")
            object.__setattr__(self, "tensors", t)
        if self.state_dtype not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {_STATE_DTYPES}, got {self.state_dtype!r}")
        if self.on_nonfinite not in _NONFINITE:
            raise ValueError(f"on_nonfinite must be 'sanitize' or 'raise', got {self.on_nonfinite!r}")

    @property
    def compresses(self) -> bool:
        """False when nothing is ever coded lossily (codec 'none' and no custom plan)."""
        return self.plan is not None or self.codec != NONE

    @classmethod
    def preset(cls, name: str, warmup_steps: int = 1, **kw) -> "CompressionConfig":
        """A named preset: the codec after ``warmup_steps`` full-precision steps, order 1 with error feedback."""
        if name not in PRESETS:
            raise ValueError(f"unknown compression preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(codec=name, warmup_steps=warmup_steps, **kw)

    def wire_spec(self, spec: str, dtype) -> str:
        """The codec that carries a plan result on the wire (warmup/none: lossless raw unless warmup_codec)."""
        if spec == WARMUP and self.warmup_codec is not None:
            return self.warmup_codec
        if spec in (WARMUP, NONE):
            return f"raw:{str(dtype).removeprefix('torch.')}"
        return spec

    def spec_for(self, layer: int, step: int) -> str:
        """The plan: codec spec, "warmup" or "none" for this (layer, step). Identical on every rank."""
        if step < self.warmup_steps:
            return WARMUP
        if self.plan is None:
            return self.codec
        spec = self.plan(layer, step)
        if not isinstance(spec, str):
            raise TypeError(f"compression plan returned {spec!r} for (layer={layer}, step={step}); it must return a codec spec string")
        _check_spec(spec, f"compression plan at (layer={layer}, step={step})")
        return spec

    def fingerprint(self, layers: int = 8, steps: int = 64) -> str:
        """A stable digest of the configuration (custom plans are sampled on a grid) for the start-up agreement check."""
        items = [self.codec, self.residual_order, self.error_feedback, self.warmup_steps, self.delta_decay,
                 self.tensors, self.state_dtype, self.on_nonfinite]
        if self.warmup_codec is not None:  # appended only when set: default fingerprints are unchanged
            items.append(("warmup_codec", self.warmup_codec))
        if self.plan is not None:
            items.append([self.spec_for(l, s) for l in range(layers) for s in range(steps)])
        return hashlib.sha256(repr(items).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"codec": self.codec, "residual_order": self.residual_order, "error_feedback": self.error_feedback,
                "warmup_steps": self.warmup_steps, "warmup_codec": self.warmup_codec,
                "delta_decay": self.delta_decay,
                "plan": None if self.plan is None else getattr(self.plan, "__name__", "custom"),
                "tensors": list(self.tensors) if self.tensors else None, "state_dtype": self.state_dtype,
                "on_nonfinite": self.on_nonfinite}


def layer_plan(default: str, overrides: dict[int, str]) -> PlanFn:
    """A per-layer plan: ``overrides[layer]`` for listed layers, ``default`` elsewhere (warmup is applied first)."""
    for spec in (default, *overrides.values()):
        _check_spec(spec, "layer_plan")

    def plan(layer: int, step: int) -> str:
        return overrides.get(layer, default)

    plan.__name__ = f"layer_plan({default}, {len(overrides)} overrides)"
    return plan
