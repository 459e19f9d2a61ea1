"""``python -m compactfusion.bench.pipefusion``: PipeFusion's fidelity and bytes per boundary codec on the digits model.

W ranks (default 4), M = W patches, 20 steps, the given seeds batched in one call; PSNR of each method's
images against the single-device output, and the bytes rank 0 sent (boundary payloads) next to uncompressed
ring and ring + binary. Prints a markdown table (the figures in docs/models.md "PipeFusion").
"""
from __future__ import annotations

import argparse
import math
import time

METHODS = (("pipefusion", "pipefusion", None), ("pipefusion+int8", "pipefusion", "int8"),
           ("pipefusion+int4", "pipefusion", "int4"), ("pipefusion+int2", "pipefusion", "int2"),
           ("pipefusion+binary", "pipefusion", "binary"), ("ring", "ring", None), ("ring+binary", "ring", "binary"))


def worker(rank, world, methods, seeds, steps):
    import torch
    import compactfusion as cf
    from compactfusion.bundled.digits import load_digits_pipeline

    labels = [7, 3, 1, 8, 0, 2, 4, 5, 6, 9]

    def call(pipe):
        return pipe(prompt=labels[:seeds], num_inference_steps=steps, guidance_scale=2.5,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    def fresh():  # pipefusion releases the other stages' weights: every method loads its own pipeline
        pipe = load_digits_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe
    rows = []
    with torch.no_grad():
        ref = call(fresh())
        for name, strategy, codec in methods:
            pipe = fresh()
            cf.parallelize(pipe, cf.ParallelConfig(strategy=strategy, compression=codec))
            t0 = time.perf_counter()
            img = call(pipe)
            wall = time.perf_counter() - t0
            mse = float(((img - ref) ** 2).mean())
            rows.append(dict(name=name, psnr=10 * math.log10(1 / max(mse, 1e-20)), sent=cf.stats(pipe)["bytes_sent"],
                             wall_s=wall))
            cf.unparallelize(pipe)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2, help="images per call (one label each)")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    from .harness import run_ranks
    rows = run_ranks(worker, a.world, METHODS, a.seeds, a.steps, timeout=1800)[0]
    print(f"| method (W={a.world}, {a.steps} steps, {a.seeds} images) | PSNR vs single device | bytes sent by rank 0 |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['psnr']:.2f} dB | {r['sent'] / 1e6:.3f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
