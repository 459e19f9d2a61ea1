"""Bench methods by name: one grammar, read by every bench, for "which strategy, which codec, which variant".

    name     := strategy ["+" codec] {"/" variant}
    strategy := a registered strategy (``parallel.registry.STRATEGIES``) | "usp(UxR)" (Ulysses degree x ring degree)
    codec    := any spec ``codecs.get_codec`` accepts | "auto"
    variant  := "noef" (no error feedback) | "naive" (order 0, no error feedback: the raw activation coded)
              | "o2" (order-2 prediction) | "o2auto" (order 2, delta decay fitted per stream)
              | "<codec>-warmup" (the warmup steps coded lossily with error feedback from step 0)

So a strategy added to the registry or a codec added to the codec registry can be run by every bench's
``--methods`` (and by the default lists written as names) without editing any bench: ``method(name)`` turns a
name into the fields ``parallel_config`` needs, and ``parallel_config`` into the library's own
``ParallelConfig``. A name that does not parse is a ``ValueError`` naming the part to change.
"""
from __future__ import annotations

import re

__all__ = ["method", "methods_of", "selected", "parallel_config", "family_of"]

_USP = re.compile(r"usp\((\d+)x(\d+)\)$")
_WARMUP = re.compile(r"(.+)-warmup$")


def family_of(strategy: str, codec: str, ablation: bool) -> str:
    """The plot group of a method: what kind of approximation it makes."""
    if ablation:
        return "ablation"
    if strategy == "pipefusion":
        return "pipeline (stale)" if codec == "none" else "pipeline+compact"
    if strategy == "distrifusion":
        return "stale" if codec == "none" else "stale+compact"
    if codec == "none":
        return "exact"
    if codec.startswith("lowrank-int4-bpe:") and 0.9 <= float(codec.split(":")[1]) <= 1.1:
        return "compact (~1 bit)"
    return "compact"


def method(name: str) -> dict:
    """The fields of one bench method (name, strategy, codec, residual_order, error_feedback, family, and where
    they apply warmup_codec, delta_decay, ulysses_degree, ring_degree) from its name."""
    from ..codecs import get_codec
    from ..parallel.registry import STRATEGIES

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a bench method is a name like 'ring+binary/o2', got {name!r}")
    head, *variants = name.strip().split("/")
    strategy, _, codec = head.partition("+")
    codec = codec or "none"
    out: dict = {"name": name.strip()}
    usp = _USP.match(strategy)
    if usp:
        out.update(ulysses_degree=int(usp.group(1)), ring_degree=int(usp.group(2)))
        strategy = "usp"
    elif strategy not in STRATEGIES or strategy == "none":
        raise ValueError(f"method {name!r}: unknown strategy {strategy!r}; use one of "
                         f"{', '.join(s for s in STRATEGIES if s != 'none')} or usp(UxR)")
    def check_codec(spec: str) -> None:
        try:
            get_codec(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"method {name!r}: codec {spec!r} is not a codec spec ({e})") from None

    if codec not in ("none", "auto"):
        check_codec(codec)
    order, ef, ablation = (None, None, False) if codec == "none" else (1, True, False)
    for v in variants:
        w = _WARMUP.match(v)
        if codec == "none":
            raise ValueError(f"method {name!r}: variant /{v} needs a codec (strategy+codec/{v})")
        if v == "noef":
            ef, ablation = False, True
        elif v == "naive":
            order, ef, ablation = 0, False, True
        elif v in ("o2", "o2auto"):
            order = 2
            if v == "o2auto":
                out["delta_decay"] = "auto"
        elif w:
            check_codec(w.group(1))
            out["warmup_codec"] = w.group(1)
        else:
            raise ValueError(f"method {name!r}: unknown variant /{v}; use noef, naive, o2, o2auto or <codec>-warmup")
    out.update(strategy=strategy, codec=codec, residual_order=order, error_feedback=ef,
               family=family_of(strategy, codec, ablation))
    return out


def methods_of(names) -> list[dict]:
    """``method`` of each name, in order (a comma-separated string or an iterable of names)."""
    if isinstance(names, str):
        names = [n for n in (x.strip() for x in names.split(",")) if n]
    return [method(n) for n in names]


def selected(names: str | None, default: list[dict]) -> list[dict]:
    """A bench's ``--methods``: ``default`` when not given, else the named methods in the given order (any name
    of this grammar, not only the defaults). ``diffusers-*`` names are the peers, run by the benches' own switch."""
    if not names:
        return default
    return methods_of([n for n in names.split(",") if n.strip() and not n.strip().startswith("diffusers-")])


def parallel_config(m: dict, link=None, warmup: int = 1, timeout_s: float = 120.0):
    """The library's ``ParallelConfig`` for a method's fields (``codec="auto"``: the per-layer choice)."""
    from ..parallel import ParallelConfig
    from ..residual import CompressionConfig
    comp = None
    if m["codec"] == "auto":
        from ..parallel.auto import auto_compression
        comp = auto_compression(residual_order=m["residual_order"], error_feedback=m["error_feedback"],
                                warmup_steps=warmup)
    elif m["codec"] != "none":
        comp = CompressionConfig(codec=m["codec"], residual_order=m["residual_order"],
                                 error_feedback=m["error_feedback"], warmup_steps=warmup,
                                 warmup_codec=m.get("warmup_codec"), delta_decay=m.get("delta_decay", 0.5))
    return ParallelConfig(strategy=m["strategy"], compression=comp, link=link, timeout_s=timeout_s,
                          ulysses_degree=m.get("ulysses_degree"), ring_degree=m.get("ring_degree"))
