"""``compactfusion bench quality --model video``: fidelity vs bytes per method on the bundled video model.

The digits bench's protocol (bench/quality.py) on the moving-digits Wan model: one gloo group of W workers,
single-device references split over the ranks, then every method on the same seeds with ``parallelize`` /
``unparallelize`` on one loaded pipeline; seeds batched ``--batch`` per call (references with the same
batching: a seed's noise depends on it). Per method, against the single-device video of the same seed
(digit = seed % 10): PSNR over the whole clip (capped at 100 dB per video), SSIM (mean over frames), the
per-frame digit accuracy (``video_digits_data.frame_accuracy``), K/V bits per element after warmup and
bytes per video per rank (ledger), the compression ratio.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..cli.args import Parser, UsageError
from .harness import reloaded_after, run_ranks
from .methods import methods_of, parallel_config
from ..bundled.video_digits import GUIDANCE
from .quality import BEST_ONE_BIT, PSNR_CAP, WARMUP, _batches, bits_per_element, ledger_of, stream_bytes

#: The default method set (names from bench/quality.py's list); --methods picks others from it.
DEFAULT_METHODS = ("ring", "ring+binary", "ring+binary/int8-warmup", "ring+int2", "ring+int4/o2", "distrifusion",
                   BEST_ONE_BIT, "pipefusion", "pipefusion+int4/o2")
QUICK_METHODS = ("ring", "ring+binary", BEST_ONE_BIT)
STEPS = 20


def _call(pipe, seeds, steps):
    import torch
    out = pipe(prompt=[s % 10 for s in seeds], num_inference_steps=steps, guidance_scale=GUIDANCE,
               generator=torch.Generator().manual_seed(seeds[0]), output_type="np")
    return np.asarray(out.frames, dtype=np.float32)  # (n, F, H, W, 1)


def video_worker(rank, world, plan):
    """Every rank: references (calls round-robin over the ranks), then every method on every seed batch."""
    import torch.distributed as dist

    import compactfusion as cf
    from ..bundled.video_digits import load_video_digits_pipeline

    pipe = load_video_digits_pipeline(plan.get("model"))
    pipe.set_progress_bar_config(disable=True)
    steps, batches = plan["steps"], _batches(plan["seeds"], plan["batch"])
    t0 = time.perf_counter()
    mine = {i: _call(pipe, b, steps) for i, b in enumerate(batches) if i % world == rank}
    ref_wall = time.perf_counter() - t0
    parts = [None] * world
    dist.all_gather_object(parts, (mine, ref_wall, sum(len(b) for i, b in enumerate(batches) if i % world == rank)))
    got = {k: v for p in parts for k, v in p[0].items()}
    refs = np.concatenate([got[i] for i in range(len(batches))])
    results = []
    for m in plan["methods"]:
        cf.parallelize(pipe, parallel_config(m, None, plan["warmup"]))
        pipe.set_progress_bar_config(disable=True)
        vids, totals, wall = [], {}, 0.0
        try:
            for b in batches:
                dist.barrier()
                t0 = time.perf_counter()
                vids.append(_call(pipe, b, steps))
                wall += time.perf_counter() - t0
                led = ledger_of(cf.stats(pipe))
                for k in ("bytes_sent", "bytes_uncompressed", "bytes_sent_after_warmup", "bytes_uncompressed_after_warmup"):
                    totals[k] = totals.get(k, 0) + led.get(k, 0)
                for k, v in stream_bytes(cf.context(pipe).ledger).items():
                    totals[k] = totals.get(k, 0) + v
        finally:
            cf.unparallelize(pipe)
            pipe = reloaded_after(pipe, m["strategy"], lambda: load_video_digits_pipeline(plan.get("model")))
        allt = [None] * world
        dist.all_gather_object(allt, (totals, wall))
        if rank == 0:
            results.append({"method": m, "videos": np.concatenate(vids), "per_rank": [t for t, _ in allt],
                            "wall_s": max(w for _, w in allt)})
    if rank != 0:
        return None
    return {"references": refs, "reference_s_per_video": max(p[1] / max(1, p[2]) for p in parts), "results": results,
            "itemsize": next(pipe.transformer.parameters()).element_size()}


def video_metrics(refs: np.ndarray, vids: np.ndarray, labels, clf) -> dict:
    from ..bundled.video_digits_data import frame_accuracy
    from ..metrics import psnr, ssim
    p = [min(PSNR_CAP, psnr(r, x)) for r, x in zip(refs, vids)]
    s = [np.mean([ssim(rf, xf) for rf, xf in zip(r, x)]) for r, x in zip(refs, vids)]
    return {"psnr": float(np.mean(p)), "psnr_min": float(np.min(p)), "ssim": float(np.mean(s)),
            "accuracy": frame_accuracy(vids, labels, clf), "max_abs_diff": float(np.abs(refs - vids).max())}


def build_parser() -> Parser:
    p = Parser(prog="compactfusion bench quality --model video", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="video", help="video (the bundled video model) or a video-digits folder")
    p.add_argument("--out", default="bench-out/quality-video")
    p.add_argument("--seeds", type=int, default=8, help="videos per method (seed i draws digit i %% 10)")
    p.add_argument("--world", type=int, default=2, help="ranks (gloo processes)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup-steps", type=int, default=WARMUP)
    p.add_argument("--batch", type=int, default=8, help="seeds per pipeline call")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list of method names (bench/methods.py grammar; default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="2 seeds, 8 steps, W=2, three methods")
    p.add_argument("--timeout", type=float, default=1800.0)
    return p


def plot(rows: list[dict], out: Path) -> str:
    """The video Pareto plot (PSNR vs K/V bits per element, log x), the digits bench's plot on the video rows."""
    from . import plots as P
    pts = [dict(r, label=r["method"]) for r in rows if r.get("bits_per_element")]
    return P.pareto(out / "quality_video_pareto.png", pts, "bits_per_element", "psnr", "label",
                    "attention-stream bits per element after warmup (ledger, log)", "PSNR vs single device (dB)",
                    "Fidelity vs bits (bundled video model; exact strategies at the fp32 wire = 32 bits)",
                    group="family")


def markdown(rows: list[dict], a, timing: dict, argv: list[str], figure: str | None = None) -> str:
    from ._common import environment_markdown
    from .plots import fmt_bytes, md_table
    body = [[r["method"], r["codec"], f"{r['psnr']:.2f}", f"{r['psnr_min']:.2f}", f"{r['ssim']:.4f}",
             f"{r['accuracy']:.3f}", "-" if r["bits_per_element"] is None else f"{r['bits_per_element']:.3f}",
             fmt_bytes(r["bytes_per_video"]), f"{r['compression_ratio']:.2f}x", f"{r['wall_s_per_video']:.2f}"]
            for r in rows]
    return "\n".join([
        "## Quality vs bytes on the bundled video model (`bench quality --model video`)", "",
        f"Command: `compactfusion bench quality {' '.join(argv)}`", "",
        f"{a.seeds} videos (digit = seed % 10; 8 frames of 16x16, 512 tokens), {a.steps} steps, CFG {GUIDANCE}, "
        f"W={a.world} gloo ranks on CPU, fp32, compression warmup {a.warmup_steps} step(s), {a.batch} seeds per call "
        "(references drawn with the same batching). PSNR over the whole clip against the single-device video of the "
        "same seed (capped at 100 dB per video), SSIM the mean over frames, accuracy the share of frames a k-NN digit "
        "classifier reads as the asked digit. Bits per element: K/V streams after warmup (ledger); bytes per video "
        "per rank.", "",
        md_table(["method", "codec", "PSNR dB", "min PSNR dB", "SSIM", "frame acc.", "bits/element",
                  "bytes/video/rank", "ratio", "s/video"], body), "",
        *([f"![Fidelity vs bits on the video model]({Path(figure).name})", ""] if figure else []),
        f"Generation {timing['generation_s']:.0f} s, metrics {timing['metrics_s']:.0f} s.", "",
        "Environment:", "", environment_markdown()])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.world = min(a.seeds, 2), min(a.steps, 8), 2
        if a.methods == ",".join(DEFAULT_METHODS):
            a.methods = ",".join(QUICK_METHODS)
    for name in ("seeds", "world", "steps", "batch"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if a.world < 2:
        raise UsageError("--world must be >= 2")
    if not 0 <= a.warmup_steps < a.steps:
        raise UsageError(f"--warmup-steps must be in [0, --steps), got {a.warmup_steps}")
    model = None if a.model == "video" else a.model
    if model is not None:
        from ..bundled.video_digits import is_video_digits_folder
        if not is_video_digits_folder(model):
            raise UsageError(f"--model {model!r} is neither 'video' nor a video-digits folder")
    ms = methods_of(a.methods)  # any bench/methods.py name
    if not ms:
        raise UsageError("--methods: name at least one method, e.g. ring,ring+binary")
    seeds = list(range(a.seeds))
    plan = dict(seeds=seeds, steps=a.steps, warmup=a.warmup_steps, batch=a.batch, methods=ms, model=model)
    t0 = time.perf_counter()
    res = run_ranks(video_worker, a.world, plan, timeout=a.timeout)[0]
    gen_s = time.perf_counter() - t0

    from ..bundled.video_digits_data import train_frame_classifier
    t1 = time.perf_counter()
    clf, labels, n, refs = train_frame_classifier(), [s % 10 for s in seeds], len(seeds), res["references"]
    rows = [{"method": "single-device", "strategy": "none", "codec": "none", "family": "reference", "world_size": 1,
             **video_metrics(refs, refs, labels, clf), "bits_per_element": None, "bytes_per_video": 0.0,
             "compression_ratio": 1.0, "wall_s_per_video": res["reference_s_per_video"]}]
    for r in res["results"]:
        m, pr = r["method"], r["per_rank"]
        sent, unc = (sum(x[k] for x in pr) for k in ("bytes_sent", "bytes_uncompressed"))
        kv_sent, kv_unc = (sum(x.get(k, 0) for x in pr) for k in ("kv_bytes_sent_after_warmup",
                                                                  "kv_bytes_uncompressed_after_warmup"))
        rows.append({"method": m["name"], "strategy": m["strategy"], "codec": m["codec"], "family": m["family"],
                     "warmup_codec": m.get("warmup_codec") or "lossless", "world_size": a.world,
                     **video_metrics(refs, r["videos"], labels, clf),
                     "bits_per_element": bits_per_element(kv_sent, kv_unc, res["itemsize"]),
                     "bytes_per_video": sent / a.world / n, "compression_ratio": unc / sent if sent else 1.0,
                     "wall_s_per_video": r["wall_s"] / n})
    for row in rows:
        row.update(model="video-digits", seeds=n, steps=a.steps, warmup_steps=a.warmup_steps)
    timing = {"generation_s": gen_s, "metrics_s": time.perf_counter() - t1}
    from ._common import write_outputs
    command = argv if any(x.startswith("--model") for x in argv) else ["--model", "video", *argv]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    figure = plot(rows, Path(a.out))
    write_outputs(Path(a.out), rows, markdown(rows, a, timing, command, figure))
    print(f"bench quality --model video: {len(rows)} methods x {n} videos -> {a.out}/results.{{json,csv,md}} "
          f"({gen_s:.0f} s generation)")
    for r in rows:
        bpe = "-" if r["bits_per_element"] is None else f"{r['bits_per_element']:.3f}"
        print(f"  {r['method']:<32} PSNR {r['psnr']:7.2f} dB  SSIM {r['ssim']:.4f}  acc {r['accuracy']:.3f}  bits {bpe}")
    return 0
