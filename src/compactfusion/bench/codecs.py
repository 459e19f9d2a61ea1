"""``compactfusion bench codecs``: bytes, accuracy and speed of every codec.

Per codec and shape (fp32 input): exact payload bytes, compression vs fp16, relative error of the
reconstructed step residual x_t - x_{t-1} of a synthetic temporally correlated activation
sequence, and encode+decode time next to ``x.clone()`` of the same tensor measured in the same
loop (so machine load hits both). Codecs with a fused implementation (binary, int2: see
codecs/fused) are timed twice in that loop, PyTorch reference and fused, after checking that both
put the same bytes on the wire; a targets table compares the fused times with the goals of
issue 11. A second table compares low-rank warm and cold starts over a sequence of residuals.

    compactfusion bench codecs [--quick] [--shapes 64x128,1088x3072] [--json PATH] [--out DIR] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ..codecs import CodecState, fused, get_codec
from ..codecs.registry import CODEC_SPECS
from ..codecs.lowrank import LowRankCodec
from ._common import environment_markdown, environment_record, json_safe, markdown_table, write_outputs

#: Every family the codec registry lists (CODEC_SPECS: a codec added there is benched without editing this file),
#: plus a second parameter for the parametrised families.
CODECS = tuple(dict.fromkeys(["fp16", "bf16", "raw:float32", "int8", "int4", "int2", "binary", "topk:8", "topk:16",
                              "lowrank:8", "lowrank:16", "lowrank-int4:32"]
                             + [c for c in CODEC_SPECS if c != "fp32"]))  # fp32 = raw:float32
SHAPES = ((4096, 3072), (1088, 3072), (64, 128))
QUICK_SHAPES = ((512, 384), (136, 384))
#: Codecs that have a fused implementation next to the PyTorch reference.
FUSED_SPECS = ("binary", "int2")
#: Issue 11 targets for fused encode+decode: <= 3x clone() at the two FLUX shapes, <= 100 us at 64x128.
CLONE_TARGET = 3.0
SMALL_TARGET_S = 100e-6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compactfusion bench codecs", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and fewer repetitions (smoke test)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    p.add_argument("--out", metavar="DIR", help="write DIR/results.{json,csv,md}")
    p.add_argument("--codecs", help=f"comma-separated specs (default: {','.join(CODECS)})")
    p.add_argument("--shapes", help="comma-separated NxC shapes (default: "
                   + ",".join(f"{n}x{c}" for n, c in SHAPES) + "; quick: " + ",".join(f"{n}x{c}" for n, c in QUICK_SHAPES) + ")")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per codec (default 5, quick 2; scaled up to 40x for small shapes)")
    p.add_argument("--steps", type=int, default=None, help="residual steps for warm vs cold (default 8, quick 4)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---- data ------------------------------------------------------------------------------------


class CorrelatedActivations:
    """Synthetic activations with the statistics that matter to residual coding.

    x_t = rho * x_{t-1} + sqrt(1 - rho^2) * e_t (rho = 0.95, so adjacent steps have cosine
    similarity ~0.95 like the FLUX dumps), e_t = (U diag(s) W_t V^T + 0.3 * noise) * chan:
    a persistent low-rank subspace with a decaying spectrum (s_j = j^-0.8, 64 components) whose
    mixing W_t drifts (AR(1), 0.9 per step) so consecutive residuals share their dominant
    directions, plus i.i.d. noise and log-normal per-channel magnitudes.
    """

    def __init__(self, n: int, c: int, seed: int, device, rho: float = 0.95, k: int = 64):
        self.g = torch.Generator().manual_seed(seed)
        self.n, self.c, self.rho, self.k, self.device = n, c, rho, k, torch.device(device)
        spectrum = torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
        self.left = torch.randn(n, k, generator=self.g) * spectrum * (3.0 / spectrum.norm())
        self.right = torch.randn(c, k, generator=self.g)
        self.chan = torch.exp(0.5 * torch.randn(c, generator=self.g))
        self.w = torch.randn(k, k, generator=self.g) / k**0.5
        self.x = self._innovation()

    def _innovation(self) -> torch.Tensor:
        fresh = torch.randn(self.k, self.k, generator=self.g) / self.k**0.5
        self.w = 0.9 * self.w + (1 - 0.9**2) ** 0.5 * fresh
        e = self.left @ self.w @ self.right.T + 0.3 * torch.randn(self.n, self.c, generator=self.g)
        return e.mul_(self.chan)

    def step_residual(self) -> torch.Tensor:
        """Advance one step; returns x_t - x_{t-1} on the target device."""
        new = self.x * self.rho + self._innovation() * (1 - self.rho**2) ** 0.5
        residual = new - self.x
        self.x = new
        return residual.to(self.device)


# ---- measurement -----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel_err(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y.double() - x.double()).norm() / x.double().norm().clamp_min(1e-30))


def _timed(fn, dev: torch.device):
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0


def measure(spec: str, x: torch.Tensor, reps: int) -> dict:
    n, c = x.shape
    dev = x.device
    impls = {"reference": get_codec(spec, impl="reference")}
    backend = fused.backend("auto", dev) if spec in FUSED_SPECS else "reference"
    if backend != "reference":
        impls["fused"] = get_codec(spec, impl="fused")
    codec = impls["reference"]
    payload = codec.encode(x)
    y = codec.decode(payload, (n, c), dtype=x.dtype)
    err = _rel_err(y, x)
    if "fused" in impls:
        fp = impls["fused"].encode(x)
        same = torch.equal(fp, payload) and torch.equal(impls["fused"].decode(fp, (n, c), dtype=x.dtype), y)
        if not same:
            raise RuntimeError(f"{spec}: the fused path's bytes or reconstruction differ from the reference")
    clone_t = []
    enc_t = {k: [] for k in impls}
    dec_t = {k: [] for k in impls}
    for _ in range(reps):  # interleaved so that load drift hits clone and every implementation alike
        z, t = _timed(x.clone, dev)
        clone_t.append(t)
        del z
        for name, cd in impls.items():
            payload, t = _timed(lambda: cd.encode(x), dev)
            enc_t[name].append(t)
            y, t = _timed(lambda: cd.decode(payload, (n, c), dtype=x.dtype), dev)
            dec_t[name].append(t)
            del y
    clone = statistics.median(clone_t)
    encdec = {k: statistics.median(e + d for e, d in zip(enc_t[k], dec_t[k])) for k in impls}
    best = {k: min(e + d for e, d in zip(enc_t[k], dec_t[k])) for k in impls}  # the least-disturbed repetition
    nbytes = payload.numel()
    if nbytes != codec.encoded_nbytes(n, c):
        raise RuntimeError(f"{spec}: payload has {nbytes} bytes, encoded_nbytes says {codec.encoded_nbytes(n, c)}")
    row = {
        "codec": spec,
        "n": n,
        "c": c,
        "bytes": nbytes,
        "ratio_vs_fp16": 2 * n * c / nbytes,
        "rel_error": err,
        "encode_s": statistics.median(enc_t["reference"]),
        "decode_s": statistics.median(dec_t["reference"]),
        "encode_decode_s": encdec["reference"],
        "clone_s": clone,
        "encdec_over_clone": encdec["reference"] / clone if clone > 0 else float("nan"),
        "fused_backend": backend if "fused" in impls else None,
        "reps": reps,
        "device": str(dev),
    }
    if "fused" in impls:
        row.update({
            "fused_encode_s": statistics.median(enc_t["fused"]),
            "fused_decode_s": statistics.median(dec_t["fused"]),
            "fused_encode_decode_s": encdec["fused"],
            "fused_encode_decode_best_s": best["fused"],
            "clone_best_s": min(clone_t),
            "fused_over_clone": encdec["fused"] / clone if clone > 0 else float("nan"),
            "fused_speedup": encdec["reference"] / encdec["fused"] if encdec["fused"] > 0 else float("nan"),
        })
    return row


def targets(rows: list[dict]) -> list[dict]:
    """Issue 11's goals for the fused codecs, checked against the measured rows."""
    out = []
    for r in rows:
        if r.get("fused_encode_decode_s") is None:
            continue
        best = r.get("fused_encode_decode_best_s", r["fused_encode_decode_s"])
        if (r["n"], r["c"]) == (64, 128):
            goal, value = f"<= {SMALL_TARGET_S * 1e6:.0f} us", f"{r['fused_encode_decode_s'] * 1e6:.0f} us"
            best_value = f"{best * 1e6:.0f} us"
            ok = r["fused_encode_decode_s"] <= SMALL_TARGET_S
        elif r["n"] * r["c"] >= 1088 * 3072:
            goal, value = f"<= {CLONE_TARGET:g}x clone", f"{r['fused_over_clone']:.2f}x clone"
            clone_best = r.get("clone_best_s", r["clone_s"])
            best_value = f"{best / clone_best:.2f}x clone" if clone_best > 0 else "-"
            ok = r["fused_over_clone"] <= CLONE_TARGET
        else:  # the goals are set for a 64x128 stream and the FLUX shapes only
            continue
        out.append({"codec": r["codec"], "shape": f"{r['n']} x {r['c']}", "goal": goal, "measured": value,
                    "best": best_value, "met": "yes" if ok else "**no**"})
    return out


def warm_vs_cold(n: int, c: int, steps: int, seed: int, device, rank: int = 8) -> list[dict]:
    """Mean residual error over a correlated sequence: cold 2 iterations vs warm 2 and 1."""
    variants = {
        f"lowrank:{rank} cold, 2 iters": (LowRankCodec(rank, iters=2), False),
        f"lowrank:{rank} warm, 2 iters": (LowRankCodec(rank, iters=2), True),
        f"lowrank:{rank} warm, 1 iter": (LowRankCodec(rank, iters=1), True),
        f"lowrank:{rank} cold, 4 iters": (LowRankCodec(rank, iters=4), False),
    }
    states = {name: CodecState() for name in variants}
    errs = {name: [] for name in variants}
    times = {name: [] for name in variants}
    data = CorrelatedActivations(n, c, seed, device)
    dev = torch.device(device)
    for _ in range(steps):
        r = data.step_residual()
        for name, (codec, warm) in variants.items():
            _sync(dev)
            t0 = time.perf_counter()
            p = codec.encode(r, state=states[name] if warm else None)
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
            errs[name].append(_rel_err(codec.decode(p, (n, c)), r))
    rows = []
    for name, (codec, warm) in variants.items():
        later = errs[name][1:] or errs[name]  # step 0 has nothing to warm from
        rows.append({
            "codec": name,
            "n": n,
            "c": c,
            "bytes": codec.encoded_nbytes(n, c),
            "ratio_vs_fp16": 2 * n * c / codec.encoded_nbytes(n, c),
            "rel_error": statistics.fmean(later),
            "encode_s": statistics.median(times[name]),
            "steps": steps,
            "warm_start": warm,
            "iters": codec.iters,
            "device": str(dev),
        })
    return rows


# ---- report ----------------------------------------------------------------------------------

MAIN_COLUMNS = (
    ("codec", "codec"), ("shape", "N x C"), ("bytes", "bytes"), ("ratio_vs_fp16", "ratio vs fp16"),
    ("rel_error", "rel. error (residual)"), ("clone_ms", "clone ms"), ("encode_decode_ms", "reference enc+dec ms"),
    ("encdec_over_clone", "reference / clone"), ("fused_encode_decode_ms", "fused enc+dec ms"),
    ("fused_over_clone", "fused / clone"), ("fused_speedup", "fused speed-up"),
)
MISSED_NOTE = (
    "Where a goal is missed, why: to stay byte-identical with the reference, the fused encoder keeps the "
    "reference's order-dependent torch calls (row and column sums of |x| on the same row blocks, mean, sqrt), "
    "so an encode is one C pass writing |x| and the sign bits, two torch reductions over that buffer, "
    "(int2) a second C pass for the fields, and a decode pass; about 9 dispatches per encode+decode. At "
    "64x128 the work itself takes a few microseconds and these dispatches (each a few microseconds on this "
    "machine, several times that under load) are the cost; at the FLUX shapes the passes are memory-bound "
    "and the ratio to clone() depends on how much of each pass other processes' load stretches: with 2 "
    "threads on an oversubscribed machine every parallel region (torch's and the kernels') can wait a "
    "scheduler time slice for its second thread, so medians swing between runs; `--threads 1` avoids that."
)
TARGET_COLUMNS = (("codec", "codec"), ("shape", "N x C"), ("goal", "goal (fused enc+dec)"), ("measured", "median"),
                  ("met", "met (median)"), ("best", "best repetition (fused best / clone best)"))
WARM_COLUMNS = (
    ("codec", "variant"), ("shape", "N x C"), ("bytes", "bytes"),
    ("rel_error", "mean rel. error, steps 2..T"), ("encode_ms", "encode ms"),
)


def _display(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        d = dict(r, shape=f"{r['n']} x {r['c']}")
        for k in ("encode_decode_s", "clone_s", "encode_s", "fused_encode_decode_s"):
            if k in r:
                d[k[:-2] + "_ms"] = r[k] * 1e3
        out.append(d)
    return out


def fused_note(device: torch.device) -> str:
    kind = fused.backend("auto", device)
    if kind == "cpu-c":
        from ..codecs.fused import cpu

        lib = cpu.load()
        simd = "AVX2+F16C intrinsics" if lib.cf_simd() else "portable C"
        return f"C kernels ({simd}, built once by {cpu._compiler()}, OpenMP on torch's threads)"
    if kind == "triton":
        return "Triton kernels"
    return "none available (PyTorch reference only)"


def report(rows: list[dict], warm_rows: list[dict], env: dict, quick: bool, device=torch.device("cpu"),
           load: tuple[float, float] | None = None) -> str:
    lines = ["# Codec benchmark" + (" (quick)" if quick else ""), ""]
    lines.append(
        "fp32 input; rel. error = ||D(E(r)) - r|| / ||r|| for a step residual r = x_t - x_{t-1} of a "
        "synthetic correlated activation sequence (rho 0.95, persistent decaying low-rank subspace, "
        "log-normal channel scales); times are medians, clone = x.clone() of the same tensor in the "
        "same loop (repetitions scaled up for small shapes). reference = the PyTorch implementation; "
        f"fused = {fused_note(device)}, checked to put the same bytes on the wire and to reconstruct the "
        "same bits before it is timed. The codecs use the fused path by default (`impl=\"auto\"`)."
    )
    if load:
        lines.append(f"Machine load (1-min load average) at the start and end of the run: {load[0]:.1f} / {load[1]:.1f} "
                     f"on {os.cpu_count()} cores; times grow with it, ratios to clone much less.")
    lines += ["", markdown_table(_display(rows), MAIN_COLUMNS)]
    goals = targets(rows)
    if goals:
        lines += ["## Targets for the fused codecs", "",
                  "Goals from issue 11. `met` is judged on the medians above; the best repetition shows the cost "
                  "with the least interference from other processes on a shared machine.", "",
                  markdown_table(goals, TARGET_COLUMNS)]
        if any(g["met"] != "yes" for g in goals):
            lines += [MISSED_NOTE + (f" This run saw a load average of {max(load):.1f} on {os.cpu_count()} cores."
                                     if load else ""), ""]
    lines += ["## Low-rank warm vs cold start", ""]
    lines.append(markdown_table(_display(warm_rows), WARM_COLUMNS))
    lines += ["## Environment", "", environment_markdown(env)]
    return "\n".join(lines)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for part in text.split(","):
        try:
            n, c = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {part!r} is not NxC (e.g. 1088x3072)") from None
        if n < 1 or c < 1:
            raise ValueError(f"--shapes: {part!r} must have positive sizes")
        shapes.append((n, c))
    return tuple(shapes)


def run(argv=None) -> list[dict]:
    a = build_parser().parse_args(argv)
    specs = [s.strip() for s in a.codecs.split(",") if s.strip()] if a.codecs else list(CODECS)
    for s in specs:
        get_codec(s)  # fail fast (ValueError) on a bad spec
    reps = a.reps if a.reps is not None else (2 if a.quick else 5)
    steps = a.steps if a.steps is not None else (4 if a.quick else 8)
    if reps < 1 or steps < 2:
        raise ValueError("--reps must be >= 1 and --steps >= 2")
    if a.threads is not None:
        if a.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shapes = parse_shapes(a.shapes) if a.shapes else (QUICK_SHAPES if a.quick else SHAPES)
    env = environment_record()
    load0 = _loadavg()
    rows: list[dict] = []
    with torch.no_grad():
        for n, c in shapes:
            data = CorrelatedActivations(n, c, a.seed, device)
            data.step_residual()
            r = data.step_residual().contiguous()
            scaled = reps * max(1, min(40, 1_000_000 // (n * c)))  # tiny shapes: more samples, same wall time
            for spec in specs:
                rows.append(measure(spec, r, scaled))
            del data, r
        warm_shape = ([s for s in shapes if s[0] * s[1] > 64 * 128] or shapes)[-1]  # 1088x3072 by default
        warm_rows = warm_vs_cold(*warm_shape, steps=steps, seed=a.seed + 1, device=device)
    load1 = _loadavg()
    md = report(rows, warm_rows, env, a.quick, device, None if load0 is None or load1 is None else (load0, load1))
    print(md)
    all_rows = rows + warm_rows
    if a.json:
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(all_rows), indent=1) + "\n", encoding="utf-8")
    if a.out:
        write_outputs(a.out, all_rows, md)
    return all_rows


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
