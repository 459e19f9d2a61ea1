"""``ParallelConfig``: which attention strategy runs, over which mesh, with which compression.

Validation that needs no process group happens at construction; the checks against the world size
happen in :meth:`ParallelConfig.resolve`, which ``ParallelContext`` calls after ``init_process_group``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Union

from ..comm.link import LinkModel
from ..residual import CompressionConfig
from .registry import DEFAULT_TENSORS, REGISTRY, STRATEGIES

__all__ = ["ParallelConfig", "Mesh", "STRATEGIES", "DEFAULT_TENSORS", "AUTO_FLOOR"]



#: ``codec="auto"``'s fidelity floor per strategy (None: any candidate). pipefusion's boundary activations lose
#: 6-15 dB below 4 bits on the digits model (int4: -0.5 dB; docs/benchmarks.md), K/V streams do not.
AUTO_FLOOR = {"pipefusion": "int4"}


def _degree(x, what: str):
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {x!r}")
    return x


@dataclass(frozen=True)
class Mesh:
    """Resolved mesh ``cfg x ulysses x ring`` (row-major, ring innermost); product = world size."""

    cfg: int
    ulysses: int
    ring: int

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.cfg * self.sp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(cfg index, ulysses index, ring index) of a rank of the parallel group."""
        c, rest = divmod(rank, self.sp)
        u, r = divmod(rest, self.ring)
        return c, u, r

    def rank_of(self, c: int, u: int, r: int) -> int:
        return (c * self.ulysses + u) * self.ring + r


@dataclass(frozen=True)
class ParallelConfig:
    """How attention is parallelised across the ranks of one process group.

    strategy: "none" (one device per sequence), "patch" (synchronous K/V all-gather), "distrifusion"
        (K/V all-gather one step stale, overlapped with compute), "ring" (p2p ring attention), "ulysses"
        (all-to-all sequence <-> heads), "usp" (Ulysses inside, ring outside) or "pipefusion" (the blocks split
        into pipeline stages, the image into patches; only stage-boundary activations travel).
    compression: a ``CompressionConfig`` (or a codec spec string such as "binary"); None = uncompressed.
    link: the modelled link (``LinkModel``); None = no modelling (bytes are still counted).
    ulysses_degree, ring_degree: mesh sizes for "usp" (product = sequence-parallel world); for "ulysses"
        the SP world is the Ulysses degree, for "ring"/"patch"/"distrifusion" it is the ring. None = derived.
    cfg_parallel: split the world in two halves (conditional / unconditional batch); needs an even world.
    timeout_s: every collective and p2p op waits at most this long, then raises ``CommTimeoutError``.
    stale_warmup_steps: "distrifusion" runs synchronously (exactly) for the first steps.
    check_consistency_every: K > 0 checks every stream's state across ranks at the first attention call
        of each step t with t % K == 0 (i.e. the state after step t-1); 0 disables.
    pipefusion_degree: "pipefusion" stages (= the world per CFG half; None = derived).
    num_patches: "pipefusion" patches per step (M >= stages; None = the number of stages).
    pipefusion_text: "pipefusion", families with joint text (FLUX, SD3): "first" (default) runs the text
        tokens in the first patch pass of each step only — the later passes attend to the K/V it left, like
        an earlier patch's — so text costs one pass of compute and boundary bytes per step, not M (bundled
        digits, W=4: -0.1 dB vs "every"); "every" runs it with every patch pass (fresh text K/V each pass).
    plan: a sharding plan for the diffusers integration (``{module path: {argument: Split} | Gather}``, see
        ``compactfusion.integrations.diffusers.plans``); None = the built-in plan of the model's family.
    """

    strategy: str = "ring"
    compression: Union[CompressionConfig, str, None] = None
    link: Union[LinkModel, None] = None
    ulysses_degree: Union[int, None] = None
    ring_degree: Union[int, None] = None
    cfg_parallel: bool = False
    timeout_s: float = 60.0
    stale_warmup_steps: int = 1
    check_consistency_every: int = 0
    plan: Any = None
    pipefusion_degree: Union[int, None] = None
    num_patches: Union[int, None] = None
    pipefusion_text: Union[str, None] = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        comp = self.compression
        if comp == "auto":  # per-layer choice by measured coding time and link speed (parallel/auto.py)
            from .auto import auto_compression
            comp = auto_compression(floor=AUTO_FLOOR.get(self.strategy))
            object.__setattr__(self, "compression", comp)
        elif isinstance(comp, str):
            comp = CompressionConfig(codec=comp)
            object.__setattr__(self, "compression", comp)
        if comp is not None and not isinstance(comp, CompressionConfig):
            raise TypeError(f"compression must be a CompressionConfig, a codec spec string or None, got "
                            f"{type(comp).__name__}")
        if self.link is not None and not isinstance(self.link, LinkModel):
            raise TypeError(f"link must be a LinkModel (e.g. LinkModel(bandwidth='100MB/s', latency='50us')) or "
                            f"None, got {type(self.link).__name__}")
        _degree(self.ulysses_degree, "ulysses_degree")
        _degree(self.ring_degree, "ring_degree")
        if not isinstance(self.cfg_parallel, bool):
            raise TypeError(f"cfg_parallel must be True or False, got {self.cfg_parallel!r}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise ValueError(f"timeout_s must be a positive finite number of seconds, got {t!r}")
        if self.plan is not None and not isinstance(self.plan, Mapping) and not hasattr(self.plan, "plan"):
            raise TypeError(f"plan must be a dict {{module path: {{argument: Split}} or Gather}} (or a FamilyPlan), "
                            f"got {type(self.plan).__name__}")
        for name in ("stale_warmup_steps", "check_consistency_every"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {x!r}")
        if REGISTRY[self.strategy].mesh == "ring" and self.ulysses_degree not in (None, 1):
            raise ValueError(f"strategy {self.strategy!r} uses no Ulysses group; set ulysses_degree=None (or use "
                             f"strategy='usp' to combine Ulysses and ring)")
        if self.strategy == "ulysses" and self.ring_degree not in (None, 1):
            raise ValueError("strategy 'ulysses' uses no ring; set ring_degree=None (or use strategy='usp')")
        _degree(self.pipefusion_degree, "pipefusion_degree")
        _degree(self.num_patches, "num_patches")
        if self.strategy == "pipefusion":
            if self.ulysses_degree not in (None, 1) or self.ring_degree not in (None, 1):
                raise ValueError("strategy 'pipefusion' runs one pipeline stage per rank; sequence parallelism inside "
                                 "a stage (ulysses_degree / ring_degree) is not supported yet: leave both None")
            if self.stale_warmup_steps < 1:
                raise ValueError("strategy 'pipefusion' needs stale_warmup_steps >= 1: the first step runs the whole "
                                 "image synchronously to fill every stage's K/V buffers")
            comp = self.compression
            if comp is not None and comp.tensors is not None and "hidden" not in comp.tensors:
                raise ValueError(f"strategy 'pipefusion' sends only stage activations ('hidden'); "
                                 f"CompressionConfig(tensors={comp.tensors!r}) names tensors it never sends: use "
                                 f"tensors=None or ('hidden',)")
            if self.num_patches is not None and self.pipefusion_degree is not None \
                    and self.num_patches < self.pipefusion_degree:
                raise ValueError(f"num_patches={self.num_patches} must be >= pipefusion_degree="
                                 f"{self.pipefusion_degree} (fewer patches than stages leaves stages idle)")
            if self.pipefusion_text not in (None, "first", "every"):
                raise ValueError(f"pipefusion_text must be 'first' (text in the first patch pass of each step) or "
                                 f"'every' (text in every patch pass), got {self.pipefusion_text!r}")
        elif self.pipefusion_degree is not None or self.num_patches is not None or self.pipefusion_text is not None:
            raise ValueError(f"pipefusion_degree, num_patches and pipefusion_text apply to strategy 'pipefusion' only "
                             f"(strategy is {self.strategy!r}); leave them None")
        if self.strategy == "none" and (self.ulysses_degree not in (None, 1) or self.ring_degree not in (None, 1)):
            raise ValueError("strategy 'none' runs attention locally; leave ulysses_degree and ring_degree as None")

    # -- derived --------------------------------------------------------------------------------
    @property
    def compressing(self) -> bool:
        return self.compression is not None and self.compression.compresses

    def tensors(self) -> tuple:
        """Attention tensors whose streams are residual-coded (empty when uncompressed)."""
        if not self.compressing:
            return ()
        return self.compression.tensors or DEFAULT_TENSORS[self.strategy]

    def resolve(self, world: int) -> Mesh:
        """Check the degrees against ``world`` (ranks of the parallel group) and return the mesh."""
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world size must be a positive integer, got {world!r}")
        cfg = 2 if self.cfg_parallel else 1
        if world % cfg:
            raise ValueError(f"cfg_parallel=True needs an even number of ranks (one half per CFG branch), got "
                             f"world size {world}")
        sp = world // cfg
        u, r = self.ulysses_degree, self.ring_degree
        where = f"world size {world}" + (" / 2 CFG halves" if cfg == 2 else "")
        if self.strategy == "none":
            if sp != 1:
                raise ValueError(f"strategy 'none' needs a sequence-parallel world of 1, got {sp} ({where}); "
                                 f"pick a parallel strategy such as 'ring' or run {cfg} process(es)")
            return Mesh(cfg, 1, 1)
        if REGISTRY[self.strategy].mesh == "pipe":  # the stages take the ring dimension
            p = self.pipefusion_degree
            if p not in (None, sp):
                raise ValueError(f"pipefusion: pipefusion_degree={p} must equal the world per CFG half ({sp}, {where}); "
                                 f"sequence parallelism inside a stage is not supported yet")
            if self.patches(sp) < sp:
                raise ValueError(f"pipefusion: num_patches={self.num_patches} must be >= the {sp} stages ({where})")
            return Mesh(cfg, 1, sp)
        if REGISTRY[self.strategy].mesh == "ring":
            if r not in (None, sp):
                raise ValueError(f"strategy {self.strategy!r} uses the whole sequence-parallel world ({sp}, {where}) "
                                 f"as its ring, but ring_degree={r}; set ring_degree=None or {sp}")
            return Mesh(cfg, 1, sp)
        if self.strategy == "ulysses":
            if u not in (None, sp):
                raise ValueError(f"strategy 'ulysses' uses the whole sequence-parallel world ({sp}, {where}), but "
                                 f"ulysses_degree={u}; set ulysses_degree=None or {sp}")
            return Mesh(cfg, sp, 1)
        # usp
        if u is None and r is None:
            raise ValueError(f"strategy 'usp' needs ulysses_degree and/or ring_degree (product = {sp}, {where})")
        if u is None:
            if sp % r:
                raise ValueError(f"usp: ring_degree={r} does not divide the sequence-parallel world {sp} ({where})")
            u = sp // r
        if r is None:
            if sp % u:
                raise ValueError(f"usp: ulysses_degree={u} does not divide the sequence-parallel world {sp} ({where})")
            r = sp // u
        if u * r != sp:
            raise ValueError(f"usp: ulysses_degree * ring_degree = {u} * {r} = {u * r} must equal the "
                             f"sequence-parallel world {sp} ({where})")
        return Mesh(cfg, u, r)

    def patches(self, stages: int) -> int:
        """PipeFusion patches per step for ``stages`` stages (``num_patches``, default one per stage)."""
        return self.num_patches if self.num_patches is not None else stages

    def to_dict(self) -> dict:
        return {"strategy": self.strategy,
                "compression": None if self.compression is None else self.compression.to_dict(),
                "link": None if self.link is None else self.link.to_dict(),
                "ulysses_degree": self.ulysses_degree, "ring_degree": self.ring_degree,
                "cfg_parallel": self.cfg_parallel, "timeout_s": self.timeout_s,
                "stale_warmup_steps": self.stale_warmup_steps,
                "check_consistency_every": self.check_consistency_every,
                "plan": None if self.plan is None else repr(self.plan),
                "pipefusion_degree": self.pipefusion_degree, "num_patches": self.num_patches,
                "pipefusion_text": self.pipefusion_text}

    def fingerprint(self) -> str:
        """Digest of everything ranks must agree on (the compression plan is sampled by its own fingerprint)."""
        d = self.to_dict()
        d["compression"] = None if self.compression is None else self.compression.fingerprint()
        d.pop("timeout_s")  # a per-rank timeout may legitimately differ
        return hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest()[:16]
