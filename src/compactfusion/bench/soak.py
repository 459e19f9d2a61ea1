"""``compactfusion bench soak``: many sequential generations in one launch; memory, state and determinism.

    compactfusion bench soak [--generations 100] [--nproc 2] [--out DIR] [--model DIR] [--steps 8]

Starts ``--nproc`` workers once (the same elastic launcher as ``generate``), parallelizes the bundled digits
model once, then runs N generations with the same prompt and seed, as a server would run N requests.
After every generation each rank records its resident memory (psutil RSS, after ``gc.collect()``), the
residual-state bytes it still holds (``cf.stats(pipe)["state_bytes"]``: the bases of every stream, freed
at the start of the next call), the stream count, the bytes sent and a hash of the image.

Checks (all must hold, else exit code 1):
* RSS growth after the warm-up generations <= ``--max-growth`` (5 %) on every rank, measured as
  (max RSS after warm-up - RSS at the end of warm-up) / RSS at the end of warm-up;
* state bytes and stream count identical for every generation (nothing accumulates across requests);
* after ``ctx.reset()`` no state is held (0 bytes, 0 streams);
* every generation's image is bitwise identical and finite (requests are isolated; no state leaks).

Memory accounting study (skip with ``--no-state-dtype``): ``--study-images`` generations (the soak's own,
then other digits and seeds) with the stream bases stored in float32 (the model's dtype), bfloat16 and
float16 (``CompressionConfig(state_dtype=...)``): state bytes per rank and PSNR vs the single-device images.

Writes results.json / results.csv / results.md (rows: one per generation and rank, then the study rows)
and soak.json (everything, including the checks) to ``--out``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from ..cli.args import Parser, UsageError

ROW_KEYS = ("kind", "generation", "rank", "rss_mb", "state_bytes", "streams", "bytes_sent", "wall_s", "image_sha",
            "finite", "state_dtype", "images", "psnr_vs_single_device_db", "psnr_min_db", "max_abs_diff")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compactfusion bench soak", description=__doc__.splitlines()[0])
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="bench-out/soak", help="output folder (results.json/.csv/.md, soak.json)")
    p.add_argument("--model", default=None, help="default: the bundled digits model (or a digits folder)")
    p.add_argument("--prompt", default="7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--strategy", default="ring")
    p.add_argument("--codec", default="binary")
    p.add_argument("--warmup-steps", type=int, default=1, help="compression warmup steps (full precision)")
    p.add_argument("--warmup-generations", type=int, default=None,
                   help="generations before the memory baseline (default: max(2, N // 10))")
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up (fraction)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--no-state-dtype", action="store_true", help="skip the state_dtype memory/fidelity study")
    p.add_argument("--study-images", type=int, default=4, help="images (digits/seeds) per state dtype in the study")
    p.add_argument("--quiet", action="store_true")
    # what cli.generate.launch reads (single node)
    p.set_defaults(nnodes=1, node_rank=None, rdzv_endpoint=None, rdzv_backend="c10d", rdzv_id=None)
    return p


def _validate(a) -> None:
    from ..cli.generate import MAX_LOCAL_PROCS, STRATEGIES
    from ..parallel import ParallelConfig
    from ..residual import CompressionConfig

    if a.study_images < 1:
        raise UsageError(f"--study-images must be >= 1, got {a.study_images}")
    if a.generations < 1:
        raise UsageError(f"--generations must be >= 1, got {a.generations}")
    if not 1 <= a.nproc <= MAX_LOCAL_PROCS:
        raise UsageError(f"--nproc must be between 1 and {MAX_LOCAL_PROCS}, got {a.nproc}")
    if a.steps <= 0:
        raise UsageError(f"--steps must be a positive integer, got {a.steps}")
    if a.strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {a.strategy!r}")
    if a.warmup_generations is None:
        a.warmup_generations = max(2, a.generations // 10)
    if not 0 <= a.warmup_generations < a.generations:
        raise UsageError(f"--warmup-generations ({a.warmup_generations}) must be >= 0 and smaller than "
                         f"--generations ({a.generations}), so that something is measured after warm-up")
    if not 0 < a.max_growth < 10:
        raise UsageError(f"--max-growth is a fraction (0.05 = 5 %), got {a.max_growth}")
    if a.codec != "none" and a.warmup_steps >= a.steps:
        raise UsageError(f"--warmup-steps ({a.warmup_steps}) must be smaller than --steps ({a.steps})")
    if a.model is not None and not Path(a.model, "digits_pipeline.json").is_file():
        raise UsageError(f"--model {a.model!r} is not a digits-pipeline folder (the soak runs the digits model)")
    if a.model is None:
        from ..cli.generate import BUNDLED_MARKER
        if not BUNDLED_MARKER.is_file():
            raise UsageError("the bundled digits model is not installed; pass --model DIR (a digits folder)")
    from ..bundled.digits import parse_label
    parse_label(a.prompt)
    cfg = ParallelConfig(strategy=a.strategy, timeout_s=a.timeout,
                         compression=CompressionConfig(codec=a.codec, warmup_steps=a.warmup_steps))
    cfg.resolve(a.nproc)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {a.out!r} exists and is not a folder")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    _validate(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").unlink(missing_ok=True)
    from ..cli.generate import launch
    rc = launch(a, a.nproc, fn=soak_worker)
    if rc:
        return rc
    record = json.loads((out / "soak.json").read_text())
    if not a.quiet:
        print(summary_text(record))
    return 0 if record["pass"] else 1


def soak_worker(args: dict, errdir: str | None) -> int:
    """Launcher entry point (module level, so spawn can import it)."""
    from ..cli.generate import worker
    return worker(args, errdir, body=_soak_rank)


def _image_sha(img) -> str:
    import numpy as np
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()[:16]


def _soak_rank(a) -> int:
    import gc
    from dataclasses import replace
    from datetime import timedelta

    import numpy as np
    import psutil
    import torch
    import torch.distributed as dist

    from .. import api as cf
    from ..metrics import finite_psnr, psnr
    from ..bundled.digits import parse_label
    from ..loading import call_kwargs, load_pipeline
    from ..parallel import ParallelConfig
    from ..residual import CompressionConfig

    from ..cli.worker import configure_threads
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    configure_threads(torch.device("cpu"))
    dist.init_process_group("gloo", timeout=timedelta(seconds=a.timeout))
    try:
        pipe = load_pipeline(a.model, torch.float32, torch.device("cpu"))
        pipe.set_progress_bar_config(disable=True)

        def kwargs(prompt=a.prompt, seed=a.seed):
            return call_kwargs(pipe, prompt, a.steps, seed)
        # study images: the soak's own call first, then other digits and seeds
        label = parse_label(a.prompt)
        calls = [(str((label + i) % 10), a.seed + i) for i in range(0 if a.no_state_dtype else a.study_images)]
        calls[:1] = [(a.prompt, a.seed)]
        refs = [pipe(**kwargs(p, sd)).images for p, sd in calls]  # single-device images (fidelity columns)
        ref = refs[0]
        comp = CompressionConfig(codec=a.codec, warmup_steps=a.warmup_steps)
        cfg = ParallelConfig(strategy=a.strategy, compression=comp, timeout_s=a.timeout)
        cf.parallelize(pipe, cfg)
        pipe.set_progress_bar_config(disable=True)
        proc = psutil.Process()
        rows = []
        t_start = time.perf_counter()
        for g in range(1, a.generations + 1):
            t0 = time.perf_counter()
            img = pipe(**kwargs()).images
            wall = time.perf_counter() - t0
            st = cf.stats(pipe)
            gc.collect()
            rows.append(dict(kind="generation", generation=g, rank=rank, rss_mb=round(proc.memory_info().rss / 2**20, 2),
                             state_bytes=int(st["state_bytes"]), streams=int(st.get("streams", -1)),
                             bytes_sent=int(st.get("bytes_sent", 0)), wall_s=round(wall, 4), image_sha=_image_sha(img),
                             finite=bool(np.isfinite(img).all()),
                             psnr_vs_single_device_db=round(finite_psnr(psnr(ref, img)), 3)))
            if rank == 0 and not a.quiet and (g % max(1, a.generations // 10) == 0 or g == a.generations):
                print(f"soak: generation {g}/{a.generations}  rss {rows[-1]['rss_mb']:.1f} MiB  "
                      f"{time.perf_counter() - t_start:.0f} s", flush=True)
        ctx = cf.context(pipe)
        held = ctx.state_nbytes()
        ctx.reset()  # what the next call does first: every stream's state must go
        freed = dict(held_after_last_generation=int(held), after_reset_bytes=int(ctx.state_nbytes()),
                     after_reset_streams=len(ctx.checksums()))

        study = []
        if not a.no_state_dtype:
            for sd in (None, "bfloat16", "float16"):
                cf.unparallelize(pipe)
                cf.parallelize(pipe, replace(cfg, compression=replace(comp, state_dtype=sd)))
                pipe.set_progress_bar_config(disable=True)
                imgs = [pipe(**kwargs(p, seed)).images for p, seed in calls]
                st = cf.stats(pipe)
                psnrs = [finite_psnr(psnr(r, x)) for r, x in zip(refs, imgs)]
                study.append(dict(kind="state_dtype", rank=rank, state_dtype=sd or "float32 (model dtype)",
                                  state_bytes=int(st["state_bytes"]), streams=int(st.get("streams", -1)),
                                  finite=all(bool(np.isfinite(x).all()) for x in imgs), image_sha=_image_sha(imgs[0]),
                                  images=len(imgs), psnr_vs_single_device_db=round(float(np.mean(psnrs)), 3),
                                  psnr_min_db=round(float(min(psnrs)), 3),
                                  max_abs_diff=float(max(np.abs(r - x).max() for r, x in zip(refs, imgs)))))
        gathered = [None] * world
        dist.all_gather_object(gathered, dict(rows=rows, freed=freed, study=study, pid=os.getpid()))
        if rank == 0:
            _write(a, gathered, world)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _checks(a, per_rank: list[dict]) -> tuple[list[dict], dict]:
    w = a.warmup_generations
    checks, growth = [], {}
    for r, d in enumerate(per_rank):
        rss = [x["rss_mb"] for x in d["rows"]]
        base = rss[w - 1] if w > 0 else rss[0]
        g = (max(rss[w:]) - base) / base
        growth[r] = dict(rss_first_mb=rss[0], rss_baseline_mb=base, rss_max_after_warmup_mb=max(rss[w:]),
                         rss_last_mb=rss[-1], growth=round(g, 5))
        checks.append(dict(check=f"rank {r}: RSS growth after {w} warm-up generations <= {a.max_growth:.0%}",
                           value=f"{g:+.2%} ({base:.1f} -> max {max(rss[w:]):.1f} MiB)", ok=g <= a.max_growth))
        sb = {x["state_bytes"] for x in d["rows"]}
        ns = {x["streams"] for x in d["rows"]}
        checks.append(dict(check=f"rank {r}: state bytes and stream count constant across generations",
                           value=f"state bytes {sorted(sb)}, streams {sorted(ns)}", ok=len(sb) == 1 and len(ns) == 1))
        f = d["freed"]
        checks.append(dict(check=f"rank {r}: state freed by reset", value=f"{f['held_after_last_generation']} B held "
                           f"after the last generation -> {f['after_reset_bytes']} B, {f['after_reset_streams']} streams",
                           ok=f["after_reset_bytes"] == 0 and f["after_reset_streams"] == 0))
    shas = {x["image_sha"] for d in per_rank for x in d["rows"]}
    finite = all(x["finite"] for d in per_rank for x in d["rows"])
    checks.append(dict(check="every generation's image bitwise identical and finite (all ranks)",
                       value=f"{len(shas)} distinct image hash(es)", ok=len(shas) == 1 and finite))
    return checks, growth


def _write(a, per_rank: list[dict], world: int) -> None:
    import torch
    out = Path(a.out)
    checks, growth = _checks(a, per_rank)
    rows = [r for d in per_rank for r in d["rows"]] + [r for d in per_rank for r in d["study"]]
    rows = [{k: r.get(k) for k in ROW_KEYS} for r in rows]
    walls = [x["wall_s"] for x in per_rank[0]["rows"]]
    meta = dict(generations=a.generations, nproc=world, model=a.model or "bundled:digits", prompt=a.prompt,
                seed=a.seed, steps=a.steps, strategy=a.strategy, codec=a.codec, warmup_steps=a.warmup_steps,
                warmup_generations=a.warmup_generations, max_growth=a.max_growth, torch=torch.__version__,
                mean_generation_s=round(sum(walls) / len(walls), 4))
    record = {"meta": meta, "pass": all(c["ok"] for c in checks), "checks": checks, "growth": growth,
              "state_dtype_study": [r for d in per_rank for r in d["study"]]}
    md = markdown(record)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from ._common import environment_record, write_outputs  # shared bench helpers
        record["meta"]["environment"] = environment_record()
    except ImportError:
        write_outputs = None
    if write_outputs is not None:
        write_outputs(out, rows, md)
    else:  # same convention: results.json is the list of rows
        import csv
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        with open(out / "results.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(ROW_KEYS))
            wr.writeheader()
            wr.writerows(rows)
        (out / "results.md").write_text(md)
    (out / "soak.json").write_text(json.dumps(record, indent=1))


def markdown(record: dict) -> str:
    m = record["meta"]
    lines = [f"### Soak: {m['generations']} generations, {m['nproc']} ranks, {m['strategy']} + {m['codec']}, "
             f"{m['steps']} steps ({m['model']})", "",
             f"Mean generation time {m['mean_generation_s']:.3f} s; warm-up {m['warmup_generations']} generations; "
             f"torch {m['torch']}. Result: **{'PASS' if record['pass'] else 'FAIL'}**.", "",
             "| check | value | ok |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']} | {'yes' if c['ok'] else 'NO'} |" for c in record["checks"]]
    lines += ["", "| rank | RSS first (MiB) | RSS end of warm-up | max after warm-up | last | growth |",
              "|---|---|---|---|---|---|"]
    for r, g in record["growth"].items():
        lines.append(f"| {r} | {g['rss_first_mb']:.1f} | {g['rss_baseline_mb']:.1f} | {g['rss_max_after_warmup_mb']:.1f} "
                     f"| {g['rss_last_mb']:.1f} | {g['growth']:+.2%} |")
    study = record.get("state_dtype_study") or []
    if study:
        lines += ["", "State storage dtype (`CompressionConfig(state_dtype=...)`), fp32 model: residual-state bytes "
                  "held per rank after a generation, and fidelity of that generation vs the single-device image "
                  "(identical on every rank).", "",
                  "| state dtype | state bytes per rank | streams | images | mean PSNR vs single device (dB) | "
                  "min PSNR (dB) | max abs diff |",
                  "|---|---|---|---|---|---|---|"]
        by_dtype: dict = {}
        for x in sorted(study, key=lambda x: x["rank"]):
            by_dtype.setdefault(x["state_dtype"], []).append(x)
        for sd, xs in by_dtype.items():
            sizes = sorted({x["state_bytes"] for x in xs})
            size = f"{sizes[0]:,}" if len(sizes) == 1 else " / ".join(f"{x['state_bytes']:,}" for x in xs)
            psnrs = sorted({x["psnr_vs_single_device_db"] for x in xs})
            lines.append(f"| {sd} | {size} | {xs[0]['streams']} | {xs[0]['images']} | "
                         f"{' / '.join(f'{p:.2f}' for p in psnrs)} | {min(x['psnr_min_db'] for x in xs):.2f} | "
                         f"{max(x['max_abs_diff'] for x in xs):.2e} |")
    return "\n".join(lines) + "\n"


def summary_text(record: dict) -> str:
    lines = [("PASS" if record["pass"] else "FAIL") + f": soak of {record['meta']['generations']} generations"]
    lines += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}: {c['value']}" for c in record["checks"]]
    for s in record.get("state_dtype_study") or []:
        if s["rank"] == 0:
            lines.append(f"  state_dtype {s['state_dtype']}: {s['state_bytes']:,} B on rank 0, "
                         f"PSNR {s['psnr_vs_single_device_db']:.2f} dB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
