"""``compactfusion bench comm``: bytes on the wire, error and modelled link time of every parallel
attention strategy x codec, on a synthetic multi-layer workload with temporally correlated K/V.

Workload: ``layers`` attention layers, ``steps`` denoising steps; per layer, Q/K/V evolve as
``x_t = offset + AR(1)`` (rho = 0.95), so step-to-step residuals are much smaller than the activations,
as in diffusion transformers. For each world size (gloo workers spawned here, default 2 and 4), strategy
and codec, every rank runs ``ParallelContext.attention`` on its shard and compares with single-process
attention over the full sequence.

Reported per configuration:
* bytes sent per rank per step, after the compression warmup (steady state) and over all steps (ledger);
* relative L2 error of the attention output vs exact attention, over the whole sequence and all layers,
  averaged over the post-warmup steps, and at the last step;
* modelled communication time per step at 10MB/s, 100MB/s, 1GB/s, 10GB/s and unlimited bandwidth
  (virtual link: ``messages * latency + bytes / bandwidth`` per rank, slowest rank, steady state).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..cli.args import Parser, UsageError
from ..comm import link as linkmodel
from ..parallel.registry import REGISTRY

BANDWIDTHS = (("10MB/s", 10e6), ("100MB/s", 100e6), ("1GB/s", 1e9), ("10GB/s", 10e9), ("inf", math.inf))
STRATEGIES = tuple(s for s in REGISTRY if s != "none")
CODECS = ("none", "binary", "int2", "int4", "lowrank:8")
QUICK_CODECS = ("none", "binary", "int4")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compactfusion bench comm", description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="also write the JSON rows to this path")
    p.add_argument("--out", default="bench-out/comm", help="output folder (results.json/.csv/.md)")
    p.add_argument("--quick", action="store_true", help="small workload, fewer codecs (about a minute)")
    p.add_argument("--worlds", default="2,4", help="comma list of world sizes (default 2,4)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--codecs", default=None, help=f"comma list (default {','.join(CODECS)})")
    p.add_argument("--tokens", type=int, default=None, help="total sequence length (default 1024; quick 256)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=None, help="default 4 (quick 2)")
    p.add_argument("--steps", type=int, default=None, help="default 10 (quick 5)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--latency", default="50us", help="per-message latency of the modelled link")
    return p


# -- workload ----------------------------------------------------------------------------------------
def workload(layer: int, steps: int, tokens: int, heads: int, head_dim: int, rho: float = 0.95):
    """Yields (q, k, v) (1, tokens, heads, head_dim) per step for one layer; identical on every rank."""
    import torch
    g = torch.Generator().manual_seed(1000 + layer)
    shape = (1, tokens, heads, head_dim)
    off = [torch.randn(shape, generator=g) for _ in range(3)]
    x = [torch.randn(shape, generator=g) for _ in range(3)]
    for _ in range(steps):
        x = [rho * t + math.sqrt(1 - rho * rho) * torch.randn(shape, generator=g) for t in x]
        yield tuple(o + 0.5 * t for o, t in zip(off, x))


def config_for(strategy: str, codec: str, world: int, warmup: int, latency: str):
    from ..comm import LinkModel
    from ..parallel import ParallelConfig
    from ..residual import CompressionConfig
    comp = None if codec == "none" else CompressionConfig(codec=codec, warmup_steps=warmup)
    extra = {}
    if strategy == "usp":
        extra = {"ulysses_degree": 2} if world % 2 == 0 else {"ulysses_degree": 1}
    return ParallelConfig(strategy=strategy, compression=comp, timeout_s=300.0,
                          link=LinkModel(bandwidth="inf", latency=latency, mode="virtual"), **extra)


def worker(rank: int, world: int, plan: dict) -> list[dict]:
    """Runs every (strategy, codec) of ``plan`` on this rank; returns per-config ledger and error sums."""
    import torch

    from ..parallel import ParallelContext, reference_attention
    L, S, H, D, steps = plan["layers"], plan["tokens"], plan["heads"], plan["head_dim"], plan["steps"]
    out = []
    for strategy, codec in plan["configs"]:
        cfg = config_for(strategy, codec, world, plan["warmup"], plan["latency"])
        if strategy == "ulysses" and H % world:
            continue
        ctx = ParallelContext(cfg)
        err2 = [0.0] * steps
        ref2 = [0.0] * steps
        gens = [workload(layer, steps, S, H, D) for layer in range(L)]
        t0 = time.perf_counter()
        for step in range(steps):
            for layer in range(L):
                q, k, v = next(gens[layer])
                res = ctx.attention(*(ctx.shard_seq(t, 1) for t in (q, k, v)), layer=layer, step=step)
                ref = ctx.shard_seq(reference_attention(q, k, v), 1)
                err2[step] += float((res - ref).pow(2).sum())
                ref2[step] += float(ref.pow(2).sum())
        wall = time.perf_counter() - t0
        by_warm = ctx.ledger.group_by("warmup")
        steady = by_warm.get(False, {"bytes_sent": 0, "bytes_uncompressed": 0, "messages": 0})
        total = ctx.ledger.summary()
        out.append({"strategy": strategy, "codec": codec, "err2": err2, "ref2": ref2, "wall_s": wall,
                    "steady_bytes": steady["bytes_sent"], "steady_uncompressed": steady["bytes_uncompressed"],
                    "steady_messages": steady["messages"], "bytes_sent": total["bytes_sent"],
                    "bytes_uncompressed": total["bytes_uncompressed"], "messages": total["messages"],
                    "state_nbytes": ctx.state_nbytes()})
        ctx.close()
    return out


# -- aggregation ---------------------------------------------------------------------------------------
def aggregate(world: int, per_rank: list[list[dict]], plan: dict, latency_s: float) -> list[dict]:
    rows = []
    steps, warm = plan["steps"], plan["warmup"]
    for i, r0 in enumerate(per_rank[0]):
        ranks = [pr[i] for pr in per_rank]
        compressed = r0["codec"] != "none"
        steady_steps = steps - warm if compressed else steps
        # uncompressed configs have no warmup: every step is steady state
        sb = [(r["steady_bytes"], r["steady_messages"]) for r in ranks]
        if not compressed:
            sb = [(r["bytes_sent"], r["messages"]) for r in ranks]
        per_step = [(b / max(1, steady_steps), m / max(1, steady_steps)) for b, m in sb]
        err = [math.sqrt(sum(r["err2"][s] for r in ranks) / max(1e-30, sum(r["ref2"][s] for r in ranks)))
               for s in range(steps)]
        post = err[warm:] if compressed and warm < steps else err
        row = {"world": world, "strategy": r0["strategy"], "codec": r0["codec"],
               "bytes_per_step_per_rank": sum(b for b, _ in per_step) / world,
               "bytes_per_step_max_rank": max(b for b, _ in per_step),
               "messages_per_step_per_rank": sum(m for _, m in per_step) / world,
               "bytes_total": sum(r["bytes_sent"] for r in ranks),
               "compression_ratio": (sum(r["steady_uncompressed"] for r in ranks) / max(1, sum(r["steady_bytes"] for r in ranks))
                                     if compressed else 1.0),
               "rel_err_mean": sum(post) / len(post), "rel_err_last": err[-1],
               "rel_err_per_step": err, "state_nbytes_per_rank": max(r["state_nbytes"] for r in ranks),
               "wall_s": max(r["wall_s"] for r in ranks)}
        for name, bw in BANDWIDTHS:
            row[f"comm_s_per_step@{name}"] = max(linkmodel.link_cost(b, m, bw, latency_s) for b, m in per_step)
        rows.append(row)
    return rows


def _fmt_bytes(b: float) -> str:
    for unit, s in (("MB", 1e6), ("kB", 1e3)):
        if b >= s:
            return f"{b / s:.2f} {unit}"
    return f"{b:.0f} B"


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def markdown(rows: list[dict], plan: dict, latency: str) -> str:
    head = (f"# Communication benchmark (synthetic attention workload)\n\n"
            f"{plan['layers']} layers x {plan['steps']} steps, {plan['tokens']} tokens, {plan['heads']} heads x "
            f"{plan['head_dim']}, fp32, batch 1; K/V follow offset + AR(1) (rho 0.95). Compression warmup "
            f"{plan['warmup']} step(s); bytes and times are per rank per step after warmup; modelled link: "
            f"messages x {latency} + bytes / bandwidth (slowest rank). Error: relative L2 vs exact attention, "
            f"mean over post-warmup steps.\n\n")
    cols = ["world", "strategy", "codec", "bytes/step/rank", "ratio", "rel err"] + [f"t@{n}" for n, _ in BANDWIDTHS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["world"]), r["strategy"], r["codec"], _fmt_bytes(r["bytes_per_step_per_rank"]),
                 f"{r['compression_ratio']:.1f}x", f"{r['rel_err_mean']:.2e}"]
        cells += [_fmt_s(r[f"comm_s_per_step@{n}"]) for n, _ in BANDWIDTHS]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _split(text: str, allowed, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if not items or bad:
        raise UsageError(f"--{what}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}")
    return items


def _write(out: Path, rows: list[dict], md: str, json_path: str | None, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        from ._common import environment_record, write_outputs  # shared bench helpers, when present
    except ImportError:
        environment_record = write_outputs = None
    if environment_record is not None:
        meta = dict(meta, environment=environment_record())
    if write_outputs is not None:
        write_outputs(out, rows, md)
    else:
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "results.md").write_text(md)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from ..comm.link import parse_latency
    from ._common import check_codec_specs, parse_worlds
    strategies = _split(a.strategies, STRATEGIES, "strategies")
    codecs = _split(a.codecs, None, "codecs") if a.codecs else list(QUICK_CODECS if a.quick else CODECS)
    check_codec_specs(codecs)
    worlds = parse_worlds(a.worlds)
    latency_s = parse_latency(a.latency)
    plan = {"tokens": a.tokens or (256 if a.quick else 1024), "heads": a.heads, "head_dim": a.head_dim,
            "layers": a.layers or (2 if a.quick else 4), "steps": a.steps or (5 if a.quick else 10),
            "warmup": a.warmup_steps, "latency": a.latency}
    for key in ("tokens", "heads", "head_dim", "layers", "steps"):
        if plan[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1")
    if not 0 <= plan["warmup"] < plan["steps"]:
        raise UsageError("--warmup-steps must be >= 0 and smaller than --steps")

    from .harness import run_ranks
    rows = []
    for world in worlds:
        configs = [(s, c) for s in strategies for c in codecs
                   if not (s == "ulysses" and plan["heads"] % world) and not (s == "usp" and world % 2)]
        t0 = time.perf_counter()
        per_rank = run_ranks(worker, world, dict(plan, configs=configs), timeout=3600.0, threads=1)
        rows += aggregate(world, per_rank, plan, latency_s)
        print(f"bench comm: world {world}: {len(configs)} configurations in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    md = markdown(rows, plan, a.latency)
    print(md)
    _write(Path(a.out), rows, md, a.json, {"plan": plan, "worlds": worlds, "bandwidths": [n for n, _ in BANDWIDTHS]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
