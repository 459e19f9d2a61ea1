"""The one registry of attention strategies: names, the tensors each compresses by default, and the class.

Everything that lists strategies (``ParallelConfig``, the CLI, the benches) reads this table, and
``ParallelContext`` builds strategies from it; strategy modules are imported lazily so importing the
registry never imports a strategy (and no strategy imports the context).
"""
from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import NamedTuple

__all__ = ["StrategySpec", "REGISTRY", "STRATEGIES", "DEFAULT_TENSORS", "build_strategy"]


class StrategySpec(NamedTuple):
    module: str       # module under compactfusion.parallel
    cls: str          # class name in it
    tensors: tuple    # attention tensors residual-coded when CompressionConfig.tensors is None
    mesh: str         # which mesh dimension holds the parallel world: "none", "ring", "ulysses", "usp", "pipe"


REGISTRY = MappingProxyType({
    "none": StrategySpec("strategy", "LocalStrategy", ("k", "v"), "none"),
    "patch": StrategySpec("patch", "PatchStrategy", ("k", "v"), "ring"),
    "distrifusion": StrategySpec("distrifusion", "DistriFusionStrategy", ("k", "v"), "ring"),
    "ring": StrategySpec("ring", "RingStrategy", ("k", "v"), "ring"),
    # Ulysses also moves Q and the output O through its all-to-alls.
    "ulysses": StrategySpec("ulysses", "UlyssesStrategy", ("q", "k", "v", "o"), "ulysses"),
    "usp": StrategySpec("usp", "USPStrategy", ("q", "k", "v", "o"), "usp"),
    # Pipeline stages over the ring dimension; only stage-boundary activations travel.
    "pipefusion": StrategySpec("pipefusion", "PipeFusionStrategy", ("hidden",), "pipe"),
})

STRATEGIES = tuple(REGISTRY)
DEFAULT_TENSORS = MappingProxyType({name: spec.tensors for name, spec in REGISTRY.items()})


def build_strategy(name: str, ctx):
    """A new instance of strategy ``name`` bound to ``ctx`` (one per branch of a generation)."""
    spec = REGISTRY[name]
    module = importlib.import_module(f"{__package__}.{spec.module}")
    return getattr(module, spec.cls)(ctx)
