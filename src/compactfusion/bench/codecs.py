"""``compactfusion bench codecs``: bytes, accuracy and speed of every codec.

Per codec and shape (fp32 input): exact payload bytes, compression vs fp16, relative error of the
reconstructed step residual x_t - x_{t-1} of a synthetic temporally correlated activation
sequence, and encode+decode time next to ``x.clone()`` of the same tensor measured in the same
loop (so machine load hits both). A second table compares low-rank warm and cold starts over a
sequence of residuals.

    compactfusion bench codecs [--quick] [--json PATH] [--out DIR] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..codecs import CodecState, get_codec
from ..codecs.lowrank import LowRankCodec
from ._common import environment_markdown, environment_record, json_safe, markdown_table, write_outputs

CODECS = ("fp16", "bf16", "raw:float32", "int8", "int4", "int2", "binary",
          "topk:8", "topk:16", "lowrank:8", "lowrank:16", "lowrank-int4:32")
SHAPES = ((4096, 3072), (1088, 3072))
QUICK_SHAPES = ((512, 384), (136, 384))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compactfusion bench codecs", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and fewer repetitions (smoke test)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    p.add_argument("--out", metavar="DIR", help="write DIR/results.{json,csv,md}")
    p.add_argument("--codecs", help=f"comma-separated specs (default: {','.join(CODECS)})")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per codec (default 5, quick 2)")
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


def measure(spec: str, x: torch.Tensor, reps: int) -> dict:
    codec = get_codec(spec)
    n, c = x.shape
    dev = x.device
    payload = codec.encode(x)
    y = codec.decode(payload, (n, c), dtype=x.dtype)
    err = _rel_err(y, x)
    clone_t, enc_t, dec_t = [], [], []
    for _ in range(reps):  # interleaved so that load drift hits clone and codec alike
        _sync(dev)
        t0 = time.perf_counter()
        z = x.clone()
        _sync(dev)
        t1 = time.perf_counter()
        payload = codec.encode(x)
        _sync(dev)
        t2 = time.perf_counter()
        y = codec.decode(payload, (n, c), dtype=x.dtype)
        _sync(dev)
        t3 = time.perf_counter()
        clone_t.append(t1 - t0)
        enc_t.append(t2 - t1)
        dec_t.append(t3 - t2)
        del z, y
    encdec = statistics.median(e + d for e, d in zip(enc_t, dec_t))
    clone = statistics.median(clone_t)
    nbytes = payload.numel()
    if nbytes != codec.encoded_nbytes(n, c):
        raise RuntimeError(f"{spec}: payload has {nbytes} bytes, encoded_nbytes says {codec.encoded_nbytes(n, c)}")
    return {
        "codec": spec,
        "n": n,
        "c": c,
        "bytes": nbytes,
        "ratio_vs_fp16": 2 * n * c / nbytes,
        "rel_error": err,
        "encode_s": statistics.median(enc_t),
        "decode_s": statistics.median(dec_t),
        "encode_decode_s": encdec,
        "clone_s": clone,
        "encdec_over_clone": encdec / clone if clone > 0 else float("nan"),
        "device": str(dev),
    }


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
    ("rel_error", "rel. error (residual)"), ("encode_decode_ms", "enc+dec ms"), ("clone_ms", "clone ms"),
    ("encdec_over_clone", "enc+dec / clone"),
)
WARM_COLUMNS = (
    ("codec", "variant"), ("shape", "N x C"), ("bytes", "bytes"),
    ("rel_error", "mean rel. error, steps 2..T"), ("encode_ms", "encode ms"),
)


def _display(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        d = dict(r, shape=f"{r['n']} x {r['c']}")
        for k in ("encode_decode_s", "clone_s", "encode_s"):
            if k in r:
                d[k[:-2] + "_ms"] = r[k] * 1e3
        out.append(d)
    return out


def report(rows: list[dict], warm_rows: list[dict], env: dict, quick: bool) -> str:
    lines = ["# Codec benchmark" + (" (quick)" if quick else ""), ""]
    lines.append(
        "fp32 input; rel. error = ||D(E(r)) - r|| / ||r|| for a step residual r = x_t - x_{t-1} of a "
        "synthetic correlated activation sequence (rho 0.95, persistent decaying low-rank subspace, "
        "log-normal channel scales); times are medians, clone = x.clone() of the same tensor in the "
        "same loop."
    )
    lines += ["", markdown_table(_display(rows), MAIN_COLUMNS), "## Low-rank warm vs cold start", ""]
    lines.append(markdown_table(_display(warm_rows), WARM_COLUMNS))
    lines += ["## Environment", "", environment_markdown(env)]
    return "\n".join(lines)


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
    shapes = QUICK_SHAPES if a.quick else SHAPES
    env = environment_record()
    rows: list[dict] = []
    with torch.no_grad():
        for n, c in shapes:
            data = CorrelatedActivations(n, c, a.seed, device)
            data.step_residual()
            r = data.step_residual().contiguous()
            for spec in specs:
                rows.append(measure(spec, r, reps))
            del data, r
        warm_rows = warm_vs_cold(*shapes[-1], steps=steps, seed=a.seed + 1, device=device)
    md = report(rows, warm_rows, env, a.quick)
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
