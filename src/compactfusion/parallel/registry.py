"""The one registry of attention strategies: names, the tensors each compresses by default, the class and
the traffic formula.

Everything that lists strategies (``ParallelConfig``, the CLI, the benches) reads this table, and
``ParallelContext`` builds strategies from it; strategy modules are imported lazily so importing the
registry never imports a strategy (and no strategy imports the context). ``traffic`` names the strategy
module's per-step traffic formula (``parallel/traffic.py``), which ``bench project`` prices; None marks a
strategy that is not modelled there.
"""
from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import NamedTuple

__all__ = ["StrategySpec", "REGISTRY", "STRATEGIES", "DEFAULT_TENSORS", "build_strategy", "traffic_formula"]


class StrategySpec(NamedTuple):
    module: str       # module under compactfusion.parallel
    cls: str          # class name in it
    tensors: tuple    # attention tensors residual-coded when CompressionConfig.tensors is None
    mesh: str         # which mesh dimension holds the parallel world: "none", "ring", "ulysses", "usp", "pipe"
    traffic: "str | None"  # function in ``module``: (TrafficShape, wire) -> StepTraffic; None = not modelled


REGISTRY = MappingProxyType({
    # Single device: nothing travels (bench project reports it as each row's single_device_s).
    "none": StrategySpec("strategy", "LocalStrategy", ("k", "v"), "none", None),
    "patch": StrategySpec("patch", "PatchStrategy", ("k", "v"), "ring", "step_traffic"),
    "distrifusion": StrategySpec("distrifusion", "DistriFusionStrategy", ("k", "v"), "ring", "step_traffic"),
    "ring": StrategySpec("ring", "RingStrategy", ("k", "v"), "ring", "step_traffic"),
    # Ulysses also moves Q and the output O through its all-to-alls.
    "ulysses": StrategySpec("ulysses", "UlyssesStrategy", ("q", "k", "v", "o"), "ulysses", "step_traffic"),
    # Ulysses inside a ring: its traffic depends on the ulysses x ring degrees, which the planner does not sweep.
    "usp": StrategySpec("usp", "USPStrategy", ("q", "k", "v", "o"), "usp", None),
    # Pipeline stages over the ring dimension; only stage-boundary activations travel.
    "pipefusion": StrategySpec("pipefusion", "PipeFusionStrategy", ("hidden",), "pipe", "step_traffic"),
})

STRATEGIES = tuple(REGISTRY)
DEFAULT_TENSORS = MappingProxyType({name: spec.tensors for name, spec in REGISTRY.items()})


def build_strategy(name: str, ctx):
    """A new instance of strategy ``name`` bound to ``ctx`` (one per branch of a generation)."""
    spec = REGISTRY[name]
    module = importlib.import_module(f"{__package__}.{spec.module}")
    return getattr(module, spec.cls)(ctx)


def traffic_formula(name: str):
    """Strategy ``name``'s per-step traffic formula, or None when the registry marks it not modelled."""
    spec = REGISTRY[name]
    if spec.traffic is None:
        return None
    return getattr(importlib.import_module(f"{__package__}.{spec.module}"), spec.traffic)
