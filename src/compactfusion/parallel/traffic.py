"""What a strategy sends per denoising step at a given shape: the types of the library's traffic formulas.

A strategy with a formula defines ``step_traffic(shape, wire) -> StepTraffic`` in its own module and names
it in its registry entry (``StrategySpec.traffic``); :func:`~compactfusion.parallel.registry.traffic_formula`
looks it up. ``bench project`` iterates the registry and prices every formula with the codecs' sizes and
``comm.link.link_cost``, so a strategy with a formula appears there without editing the bench.

A formula is arithmetic only (no tensors, no communication). ``wire(n, c)`` gives the bytes of one residual
stream of an ``(n, c)`` matrix in the format being priced (raw, warmup or coded); what the library always
sends raw (the output gather, Ulysses' text output) uses :meth:`TrafficShape.raw`. A formula raises
ValueError when the strategy cannot run at the shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .sharding import shard_sizes

__all__ = ["TrafficShape", "StepTraffic", "OVERLAPS", "output_gather", "text_label"]

#: What a strategy's per-layer sends may hide behind (the planner's latency model reads it):
#: "none" (synchronous), "attention" (a ring hop behind the previous block's attention), "step" (a stale
#: gather behind the whole step, after the synchronous steps), "pipeline" (a stage's send behind its next slot).
OVERLAPS = ("none", "attention", "step", "pipeline")


class TrafficShape(NamedTuple):
    """One transformer call as the strategies see it (per CFG half / per expert call)."""

    world: int           # ranks of the strategy's group
    batch: int           # transformer batch (CFG folded into the stream rows)
    image_tokens: int
    text_tokens: int     # joint text inside self-attention (0: none, or text by cross-attention)
    heads: int
    head_dim: int
    out_channels: int    # channels per token of the transformer output
    layers: int          # attention layers (= blocks) that communicate
    split_text: bool = False  # text sharded like the image tokens (else replicated on every rank: never sent)
    dtype_bytes: int = 2      # the model dtype (fp16 / bf16)
    patches: "int | None" = None  # pipeline strategies: patches per step (None: one per stage)
    text_passes: "int | None" = None  # pipeline, joint text: passes per step that run it (None: 1, "first")

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    def image_shards(self) -> list[int]:
        return shard_sizes(self.image_tokens, self.world)

    def text_shards(self) -> list[int]:
        return shard_sizes(self.text_tokens, self.world) if self.split_text else [0] * self.world

    def rows(self) -> list[int]:
        """Stream rows per rank: (image + split text tokens) x batch."""
        return [self.batch * (i + t) for i, t in zip(self.image_shards(), self.text_shards())]

    def raw(self, n: int, c: int) -> int:
        """Bytes of an (n, c) matrix sent uncompressed in the model dtype."""
        return n * c * self.dtype_bytes


@dataclass(frozen=True)
class StepTraffic:
    """Per-rank sends of one denoising step (index = rank of the group)."""

    layer: tuple          # bytes a rank sends per unit (an attention layer; PipeFusion: its boundary)
    layer_msgs: int       # messages per unit per rank
    gather: tuple         # bytes a rank sends once per step, raw (the output gather)
    gather_msgs: int
    tokens: tuple         # rows of the rank's (largest) stream
    overlap: str          # one of OVERLAPS
    text: str             # "split", "replicated", "carried" (every patch pass), "carried once" or "cross-attention"
    units: "int | None" = None  # units per step: None = every attention layer (PipeFusion: 1 boundary)
    slot: int = 0         # pipeline: bytes of the largest single-patch payload (what one slot sends)
    patch_sizes: tuple = ()

    def __post_init__(self):
        if self.overlap not in OVERLAPS:
            raise ValueError(f"overlap {self.overlap!r} is not one of {OVERLAPS}")


def output_gather(shape: TrafficShape) -> tuple:
    """The runtime's all-gather of the transformer output shard at the end of every step (raw)."""
    w = shape.world
    return tuple((w - 1) * shape.raw(shape.batch * n, shape.out_channels) for n in shape.image_shards())


def text_label(shape: TrafficShape) -> str:
    """How the non-pipeline strategies hold the joint text: sharded ("split") or on every rank."""
    return "split" if shape.split_text else "replicated"
