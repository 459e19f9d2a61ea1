"""``compactfusion bench text``: text tokens split across ranks or kept whole, measured on the bundled model.

The same generations with the built-in FLUX plan (text whole on every rank, joined to each attention call)
and with a plan that splits the text like diffusers' FLUX ``_cp_plan``: bytes on the wire (ledger) and PSNR
against the single-device image, per codec. This is the measurement behind the families' text choice
(docs/models.md).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cli.args import Parser
from .harness import run_ranks

CODECS = ("none", "binary", "int2")


def _worker(rank, world, steps: int, seeds: int, codecs: tuple):
    import torch

    import compactfusion as cf
    from compactfusion.integrations.diffusers.plans import PLANS, FamilyPlan, Gather, Split
    from compactfusion.loading import load_pipeline
    from compactfusion.metrics import psnr

    pipe = load_pipeline(None, torch.float32, torch.device("cpu"))

    def kw():
        return dict(prompt=list(range(seeds)), num_inference_steps=steps, output_type="np",
                    generator=[torch.Generator().manual_seed(s) for s in range(seeds)])
    ref = pipe(**kw()).images
    split = FamilyPlan("flux, text split", {"": {"hidden_states": Split(1, 3), "encoder_hidden_states": Split(1, 3),
                                                 "img_ids": Split(0, 2), "txt_ids": Split(0, 2)},
                                            "proj_out": Gather(1, 3)})
    rows = []
    for name, plan in (("whole (built-in)", PLANS["FluxTransformer2DModel"]), ("split", split)):
        for codec in codecs:
            cf.parallelize(pipe, cf.ParallelConfig(strategy="ring", compression=None if codec == "none" else codec),
                           plan=plan)
            img = pipe(**kw()).images
            st = cf.stats(pipe)
            cf.unparallelize(pipe)
            rows.append(dict(text=name, codec=codec, bytes_sent=st["bytes_sent"],
                             psnr=sum(min(100.0, psnr(ref[i], img[i])) for i in range(seeds)) / seeds))
    return rows


def main(argv=None) -> int:
    p = Parser(prog="compactfusion bench text", description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--out", default=None, help="folder for results.json / results.md")
    a = p.parse_args(argv)
    codecs = tuple(c.strip() for c in a.codecs.split(",") if c.strip())
    rows = run_ranks(_worker, a.world, a.steps, a.seeds, codecs)[0]
    lines = [f"Bundled digits model, ring, W={a.world}, {a.steps} steps, {a.seeds} seeds (mean PSNR vs one device, "
             f"capped at 100 dB); bytes: all of rank 0's traffic per generation.", "",
             "| text | codec | bytes sent (rank 0) | PSNR (dB) |", "|---|---|---|---|"]
    lines += [f"| {r['text']} | {r['codec']} | {r['bytes_sent']:,} | {r['psnr']:.2f} |" for r in rows]
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        (out / "results.md").write_text("\n".join(lines) + "\n")
    return 0
