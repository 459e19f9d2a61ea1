"""One small adapter per diffusers transformer family: where tokens are sharded, gathered and joined.

The runtime shards the image tokens right after the module named ``token_embed`` (its output is
(B, S, C)), gathers them right after ``output`` (the last linear, which has few channels, so the gather
is cheap), and — for Flux — slices the rotary table computed by ``rotary``. Text ("joint") tokens are
replicated on every rank; ``joint_position`` says where the processor puts them in the attention call.
``batch_args`` name the inputs whose dim 0 is the (CFG-doubled) batch, for CFG parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ModelAdapter:
    name: str
    token_embed: str
    output: str
    joint_position: str  # "front", "rear" or "none"
    joint_tokens: Callable[[dict], int]
    batch_args: tuple[str, ...]
    rotary: str | None = None


def _text_len(kwargs: dict) -> int:
    ehs = kwargs.get("encoder_hidden_states")
    return 0 if ehs is None else int(ehs.shape[1])


FLUX = ModelAdapter(
    name="flux", token_embed="x_embedder", output="proj_out", joint_position="front", joint_tokens=_text_len,
    batch_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
    rotary="pos_embed")

SD3 = ModelAdapter(
    name="sd3", token_embed="pos_embed", output="proj_out", joint_position="rear", joint_tokens=_text_len,
    batch_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"))

PIXART = ModelAdapter(
    name="pixart", token_embed="pos_embed", output="proj_out", joint_position="none", joint_tokens=lambda kw: 0,
    batch_args=("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "added_cond_kwargs"))

GENERIC = ModelAdapter(
    name="generic", token_embed="pos_embed", output="proj_out", joint_position="none", joint_tokens=lambda kw: 0,
    batch_args=())  # generic: every tensor input whose dim 0 equals the batch

_BY_CLASS = {
    "FluxTransformer2DModel": FLUX,
    "SD3Transformer2DModel": SD3,
    "PixArtTransformer2DModel": PIXART,
}


def adapter_for(transformer) -> ModelAdapter:
    """The family adapter for a diffusers transformer, or the generic one when its layout allows it."""
    cls = type(transformer).__name__
    if cls in _BY_CLASS:
        return _BY_CLASS[cls]
    missing = [n for n in (GENERIC.token_embed, GENERIC.output) if not hasattr(transformer, n)]
    if missing:
        raise ValueError(
            f"compactfusion cannot parallelize {cls}: it has no {' / '.join(missing)} module, so there is no point to "
            f"shard its tokens and gather them back. Supported families: Flux, SD3, PixArt, and transformers with a "
            f"patch-embedding `pos_embed` and an output `proj_out` whose attention uses scaled_dot_product_attention.")
    return GENERIC
