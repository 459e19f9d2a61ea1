"""``python -m compactfusion.bench.pipefusion``: PipeFusion's own options on the digits model.

``bench quality`` compares PipeFusion with the other strategies at its defaults; this command sweeps what
only PipeFusion has: where the joint text runs (``pipefusion_text`` "first" / "every") and the patches per
step (``num_patches``), uncompressed and with int4 order 2 on the boundaries. W ranks (default 4), the
given images batched in one call (digit = index % 10), 20 steps; PSNR of each configuration's images
against the single-device output, the bytes rank 0 sent and the generation time (noisy: shared CPU cores).
Prints a markdown table (the text-mode figures in docs/models.md "PipeFusion").
"""
from __future__ import annotations

import argparse
import math
import time


def configs(world: int) -> list[dict]:
    out = []
    for patches in (world, 2 * world):
        for text in ("first", "every"):
            for codec in ("none", "int4"):
                out.append(dict(num_patches=patches, pipefusion_text=text, codec=codec))
    return out


def worker(rank, world, cfgs, images, steps):
    import numpy as np
    import torch

    import compactfusion as cf
    from ..bundled.digits import load_digits_pipeline

    def call(pipe):
        return pipe(prompt=[i % 10 for i in range(images)], num_inference_steps=steps, guidance_scale=2.5,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    def fresh():  # pipefusion releases the other stages' weights: every configuration loads its own pipeline
        pipe = load_digits_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe
    rows = []
    with torch.no_grad():
        ref = call(fresh())
        for c in cfgs:
            pipe = fresh()
            comp = None if c["codec"] == "none" else cf.CompressionConfig(codec=c["codec"], residual_order=2)
            cf.parallelize(pipe, cf.ParallelConfig(strategy="pipefusion", compression=comp, num_patches=c["num_patches"],
                                                   pipefusion_text=c["pipefusion_text"]))
            pipe.set_progress_bar_config(disable=True)
            t0 = time.perf_counter()
            img = call(pipe)
            wall = time.perf_counter() - t0
            psnr = [10 * math.log10(1 / max(float(np.mean((a - b) ** 2)), 1e-20)) for a, b in zip(img, ref)]
            rows.append(dict(c, psnr=float(np.mean(psnr)), sent=cf.stats(pipe)["bytes_sent"], wall_s=wall))
            cf.unparallelize(pipe)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--images", type=int, default=8, help="images per call (one digit each)")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    from ._common import environment_record
    from .harness import run_ranks
    env = environment_record()
    rows = run_ranks(worker, a.world, configs(a.world), a.images, a.steps, timeout=1800)[0]
    print(f"PipeFusion options, digits, W={a.world}, {a.steps} steps, {a.images} images; {env['cores']}-core "
          f"{env['cpu']}, torch {env['torch']}, diffusers {env['diffusers']}, {env['date_utc'][:10]}")
    print()
    print("| M | text | boundary codec | PSNR vs single device | bytes sent by rank 0 | s per call |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        codec = "none" if r["codec"] == "none" else f"{r['codec']}, order 2"
        print(f"| {r['num_patches']} | {r['pipefusion_text']} | {codec} | {r['psnr']:.2f} dB | {r['sent'] / 1e6:.2f} MB "
              f"| {r['wall_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
