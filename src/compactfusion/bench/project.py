"""``compactfusion bench project``: exact bytes and predicted latency at real model shapes (no weights).

Bytes come from the codecs' ``encoded_nbytes(N, C)`` and the traffic pattern of each strategy, so they
are exact for this library's wire format. Per rank, per attention layer, per denoising step:

* patch / distrifusion (and diffusers' native ring, which all-gathers K|V): the rank sends its K and V
  payloads to each of the W-1 peers;
* ring: W-1 hops; at hop s a rank forwards the (still compressed) payload that originated s ranks back;
* ulysses: all-to-all of q, k, v (each peer gets this rank's tokens x the peer's heads) and of the output
  o (each peer gets its own tokens x this rank's heads): (W-1)/W of the shard per tensor; with replicated
  text, the text output is all-gathered over heads (uncompressed);
* every step ends with an all-gather of the transformer output shard (uncompressed).

The matrix a stream codes is (batch * local tokens, heads * head_dim): the CFG batch is folded into N.
Warmup steps travel at full size in the model dtype (2 bytes: fp16/bf16). Text ("joint") tokens follow
each family's plan in compactfusion (``ModelSpec.library_text``): replicated on every rank (never sent,
compute repeated) in every built-in plan, or split like the image tokens (``--text-mode split``, unevenly
if need be); diffusers' context parallelism splits them only when the text length divides by W:
``text_mode`` says which applies.

Latency model (per step, per rank r, then the slowest rank; per image = sum over steps):

    t_step = compute_r + exposed_comm_r
    compute_r = t_single_step * flops_r / flops_total           (FLOP-proportional split)
    comm      = sum over messages of (latency + bytes / bandwidth)  (one outbound link per rank)
    exposed   = comm                                  patch, ulysses, diffusers-* (synchronous)
              = sum_layers max(0, comm_l - attn_l*(W-1)/W)   ring (hop s+1 hides behind block s)
              = max(0, comm - compute_r)              distrifusion after its synchronous first step

flops: linear layers ``k * C^2`` per token per layer (k = 24 for Flux/SD3/CogVideoX blocks, 28 for
PixArt with cross-attention projections) plus attention ``4 * C * S_q * S_kv``. Codec compute cost is
not modelled (the reference runs fused GPU kernels). ``t_single_step`` defaults to FLUX.1-dev's published
single-L20 time (20.26 s / 28 steps, reference table section 8.2); other models are scaled from it by
FLOP count at FLUX's measured throughput (an estimate; override with ``--step-time MODEL=SECONDS``).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ..cli.args import Parser, UsageError

__all__ = ["MODELS", "LINKS", "ModelSpec", "Link", "traffic", "predict_latency", "build_rows", "main"]

DTYPE_BYTES = 2  # fp16 / bf16 on GPUs


@dataclass(frozen=True)
class ModelSpec:
    key: str
    name: str
    layers: int           # attention layers that communicate
    heads: int
    head_dim: int
    image_tokens: int
    text_tokens: int      # joint text tokens inside self-attention (0 when text enters by cross-attention)
    batch: int            # transformer batch per image (2 with classifier-free guidance)
    steps: int
    warmup_steps: int     # compression warmup used by the reference presets
    out_channels: int     # channels per token of the transformer output (gathered every step)
    linear_flops: int     # FLOPs per token per layer of the linear layers, in units of C^2
    library_text: str = "replicated"  # how compactfusion's plan for the family treats text: "split" or "replicated"

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    def flops(self, q_tokens: int, kv_tokens: int) -> tuple[float, float]:
        """(linear, attention) FLOPs of one step for q_tokens query rows (per image batch) over kv_tokens."""
        c, b = self.channels, self.batch
        lin = self.layers * self.linear_flops * c * c * b * q_tokens
        att = self.layers * 4.0 * c * b * q_tokens * kv_tokens
        return lin, att


MODELS = {m.key: m for m in (
    ModelSpec("flux-dev-1024", "FLUX.1-dev 1024x1024 (512 text tokens)", 57, 24, 128, 4096, 512, 1, 28, 1, 64, 24),
    ModelSpec("flux-dev-1024-t256", "FLUX.1-dev 1024x1024 (256 text tokens)", 57, 24, 128, 4096, 256, 1, 28, 1, 64, 24),
    ModelSpec("sd3-medium-1024", "SD3-medium 1024x1024 (CFG)", 24, 24, 64, 4096, 333, 2, 28, 1, 64, 24),
    ModelSpec("pixart-alpha-1024", "PixArt-alpha 1024x1024 (CFG)", 28, 16, 72, 4096, 0, 2, 20, 1, 32, 28),
    ModelSpec("cogvideox-2b", "CogVideoX-2b 480x720x49 (CFG)", 30, 30, 64, 17550, 226, 2, 50, 2, 64, 24),
    # Video at published shapes (diffusers class defaults; VAE 4x8x8, patch 1x2x2): Wan 2.1 14B and Wan 2.2
    # A14B (two experts of the same shape, one per step) at 720x1280x81 -> 21x45x80 tokens, text by
    # cross-attention, cond/uncond as two calls per step (batch 2 in traffic); HunyuanVideo 720x1280x129 ->
    # 33x45x80 tokens, 20 double + 40 single blocks, 256 text tokens replicated at the rear of attention.
    ModelSpec("wan21-14b-720p", "Wan 2.1 14B 720x1280x81 (CFG, 2 calls)", 40, 40, 128, 75600, 0, 2, 50, 1, 64, 23),
    ModelSpec("wan22-a14b-720p", "Wan 2.2 A14B 720x1280x81 (CFG, 2 calls)", 40, 40, 128, 75600, 0, 2, 40, 1, 64, 23),
    ModelSpec("hunyuanvideo-720p", "HunyuanVideo 720x1280x129", 60, 24, 128, 118800, 256, 1, 50, 1, 64, 24,
              library_text="replicated"),
)}

#: Published single-device FLUX.1-dev time (reference table 8.2, "Original", 4xL20 machine): 28 steps.
FLUX_L20_S = 20.26
FLUX_L20_TEXT = 256  # the reference ran max_sequence_length=256


@dataclass(frozen=True)
class Link:
    key: str
    label: str
    bandwidth: float  # bytes/s per direction per rank (inf = unlimited)
    latency: float    # seconds per message


LINKS = (
    Link("nvlink", "NVLink 4 (450 GB/s)", 450e9, 2e-6),
    Link("pcie4", "PCIe 4 x16 (25 GB/s eff.)", 25e9, 5e-6),
    Link("100gbe", "100 GbE", 12.5e9, 20e-6),
    Link("25gbe", "25 GbE", 3.125e9, 20e-6),
    Link("10gbe", "10 GbE", 1.25e9, 20e-6),
    Link("2000mbs", "2000 MB/s", 2000e6, 0.0),
    Link("1500mbs", "1500 MB/s", 1500e6, 0.0),
    Link("1000mbs", "1000 MB/s", 1000e6, 0.0),
    Link("500mbs", "500 MB/s", 500e6, 0.0),
    Link("unlimited", "unlimited", math.inf, 0.0),
)

STRATEGIES = ("patch", "distrifusion", "ring", "ulysses", "diffusers-ring", "diffusers-ulysses")
CODECS = ("none", "int8", "int4", "int2", "binary", "lowrank:8", "lowrank-int4:32", "lowrank-int4-bpe:1.1")
#: What warmup steps send: full precision ("fp16": the model dtype, 2 bytes) or a lossy codec spec.
WARMUP_FULL = ("fp16", "none")
WARMUPS = ("fp16", "int8", "int4")
WORLDS = (2, 4, 8)

#: Reference latency table (section 8.2): FLUX.1-dev 1024^2, 28 steps, 4 GPUs, seconds.
PUBLISHED = {
    "columns": [("L20 PCIe", 20.26, 25e9, 5e-6), ("H20 NVLink", 23.16, 450e9, 2e-6), ("500MB", 28.06, 500e6, 0.0),
                ("1000MB", 28.06, 1000e6, 0.0), ("1500MB", 28.06, 1500e6, 0.0), ("2000MB", 28.06, 2000e6, 0.0)],
    "rows": {  # label -> (strategy, codec, published seconds per column)
        "Original": (None, None, (20.26, 23.16, 28.06, 28.06, 28.06, 28.06)),
        "Ring Attention": ("ring", "none", (7.54, 10.89, 136.52, 76.12, 58.31, 44.41)),
        "Compact-1bit": ("ring", "binary", (6.86, 7.46, 20.91, 15.74, 14.76, 13.89)),
        "Compact-2bit": ("ring", "int2", (6.70, 7.57, 27.48, 19.82, 17.76, 16.08)),
        "DistriFusion": ("distrifusion", "none", (6.86, 8.05, 139.73, 78.73, 58.41, 42.21)),
        "Patch Parallel": ("patch", "none", (6.83, 10.90, 141.55, 79.52, 44.63, 43.36)),
        "Ulysses": ("ulysses", "none", (6.70, 9.13, 75.62, 46.47, 38.94, 30.73)),
    },
}


# -- bytes -------------------------------------------------------------------------------------------
def shard_sizes(total: int, world: int) -> list[int]:
    q, r = divmod(total, world)
    return [q + 1 if i < r else q for i in range(world)]


_CODEC_CACHE: dict = {}


def encoded_nbytes(spec: str, n: int, c: int, dtype_bytes: int = DTYPE_BYTES) -> int:
    """Wire bytes of an (n, c) stream coded with ``spec`` ("none" = raw in the model dtype)."""
    if n == 0 or c == 0:
        return 0
    if spec in ("none", "warmup"):
        return n * c * dtype_bytes
    from ..codecs import get_codec
    codec = _CODEC_CACHE.get(spec)
    if codec is None:
        codec = _CODEC_CACHE[spec] = get_codec(spec)
    return int(codec.encoded_nbytes(n, c))


def text_split(model: ModelSpec, strategy: str, world: int, text_mode: str) -> bool:
    """Whether text tokens are sharded (and communicated) rather than replicated on every rank."""
    if model.text_tokens == 0:
        return False
    mode = text_mode if text_mode != "library" else ("split" if strategy.startswith("diffusers") else model.library_text)
    # diffusers' sharder needs even splits (else it cannot run); ours splits unevenly
    return mode == "split" and (not strategy.startswith("diffusers") or model.text_tokens % world == 0)


def feasible(model: ModelSpec, strategy: str, world: int) -> str | None:
    """None, or why this (model, strategy, world) cannot run."""
    if strategy.endswith("ulysses") and model.heads % world:
        return f"{model.heads} heads do not split over {world} ranks"
    if model.image_tokens < world:
        return "fewer tokens than ranks"
    return None


def traffic(model: ModelSpec, strategy: str, codec: str, world: int, text_mode: str = "library",
            dtype_bytes: int = DTYPE_BYTES, warmup: str = "fp16") -> dict:
    """Per-rank bytes and messages of one denoising step, for a warmup step and for a coded step.

    ``warmup``: what a compression warmup step sends, "fp16" (full precision in the model dtype) or a codec
    spec (``CompressionConfig.warmup_codec``, e.g. "int8"): the raw activation coded lossily.

    Returns lists indexed by rank: ``layer_warm``/``layer_coded`` (bytes one layer sends), ``layer_raw``
    (uncompressed equivalent), ``layer_msgs``; ``gather`` (output all-gather bytes per step) and
    ``gather_msgs``; plus ``tokens`` (N of this rank's K/V stream) and ``split_text``.
    """
    w, c, b = world, model.channels, model.batch
    img = shard_sizes(model.image_tokens, w)
    split = text_split(model, strategy, w, text_mode)
    txt = shard_sizes(model.text_tokens, w) if split else [0] * w
    n = [b * (i + t) for i, t in zip(img, txt)]
    coded_spec = codec if codec != "none" and not strategy.startswith("diffusers") else "none"
    warm_spec = warmup if coded_spec != "none" and warmup not in WARMUP_FULL else "none"

    def per_rank(spec: str) -> list[int]:
        if w == 1:
            return [0]
        if strategy in ("patch", "distrifusion", "diffusers-ring"):
            return [2 * (w - 1) * encoded_nbytes(spec, n[r], c, dtype_bytes) for r in range(w)]
        if strategy == "ring":
            kv = [2 * encoded_nbytes(spec, n[r], c, dtype_bytes) for r in range(w)]
            return [sum(kv[(r - s) % w] for s in range(w - 1)) for r in range(w)]
        if strategy in ("ulysses", "diffusers-ulysses"):
            ch = c // w
            # replicated text (compactfusion): each rank attends its heads of the text queries, then the text
            # output is all-gathered over heads, uncompressed
            joint_o = 0 if split else (w - 1) * b * model.text_tokens * ch * dtype_bytes
            out = []
            for r in range(w):
                qkv = 3 * (w - 1) * encoded_nbytes(spec, n[r], ch, dtype_bytes)
                o = sum(encoded_nbytes(spec, n[p], ch, dtype_bytes) for p in range(w) if p != r)
                out.append(qkv + o + joint_o)
            return out
        raise ValueError(f"unknown strategy {strategy!r}")

    # messages per layer: K|V travel as one payload; Ulysses packs q|k|v into one all-to-all, then o (+ text o)
    msgs = {"patch": w - 1, "distrifusion": w - 1, "diffusers-ring": w - 1, "ring": w - 1,
            "ulysses": (2 + (model.text_tokens > 0 and not split)) * (w - 1), "diffusers-ulysses": 4 * (w - 1)}[strategy]
    gather = [(w - 1) * b * img[r] * model.out_channels * dtype_bytes for r in range(w)]
    return {"layer_warm": per_rank(warm_spec), "layer_coded": per_rank(coded_spec), "layer_raw": per_rank("none"),
            "layer_msgs": msgs if w > 1 else 0, "gather": gather if w > 1 else [0], "gather_msgs": w - 1,
            "tokens": n, "split_text": split, "image_shards": img, "text_shards": txt}


def image_bytes(model: ModelSpec, tr: dict, codec: str, warmup: int) -> dict:
    """Per-rank bytes of one image from a ``traffic`` dict (mean and max over ranks)."""
    L, S = model.layers, model.steps
    w_steps = min(warmup, S) if codec != "none" else 0
    per = [w_steps * L * tw + (S - w_steps) * L * tc + S * g
           for tw, tc, g in zip(tr["layer_warm"], tr["layer_coded"], tr["gather"])]
    raw = [S * (L * tr_ + g) for tr_, g in zip(tr["layer_raw"], tr["gather"])]
    step_coded = [L * tc + g for tc, g in zip(tr["layer_coded"], tr["gather"])]
    step_warm = [L * tw + g for tw, g in zip(tr["layer_warm"], tr["gather"])]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"bytes_per_image": mean(per), "bytes_per_image_max_rank": max(per),
            "bytes_per_image_uncompressed": mean(raw), "bytes_per_step": mean(step_coded),
            "bytes_per_step_warmup": mean(step_warm), "bytes_per_step_uncompressed": mean(raw) / S,
            "bytes_per_image_all_ranks": sum(per)}


# -- latency -----------------------------------------------------------------------------------------
def flux_throughput() -> float:
    """FLOP/s implied by the published single-L20 FLUX.1-dev time (28 steps, 256 text tokens)."""
    m = replace(MODELS["flux-dev-1024"], text_tokens=FLUX_L20_TEXT)
    s = m.image_tokens + m.text_tokens
    lin, att = m.flops(s, s)
    return (lin + att) * m.steps / FLUX_L20_S


def default_step_time(model: ModelSpec) -> float:
    s = model.image_tokens + model.text_tokens
    lin, att = model.flops(s, s)
    return (lin + att) / flux_throughput()


def rank_compute(model: ModelSpec, tr: dict, world: int, t_step: float) -> tuple[list[float], list[float]]:
    """(compute seconds per step, of which attention) for each rank, FLOP-proportional to the single device."""
    s = model.image_tokens + model.text_tokens
    lin, att = model.flops(s, s)
    total = lin + att
    comp, attn = [], []
    for r in range(world):
        text_r = tr["text_shards"][r] if tr["split_text"] else model.text_tokens
        q = tr["image_shards"][r] + text_r
        l_r, a_r = model.flops(q, s)
        comp.append(t_step * (l_r + a_r) / total)
        attn.append(t_step * a_r / total)
    return comp, attn


def predict_latency(model: ModelSpec, strategy: str, codec: str, world: int, link: Link, t_step: float,
                    warmup: int | None = None, text_mode: str = "library", stale_sync_steps: int = 1,
                    warmup_codec: str = "fp16") -> float:
    """Seconds per image (denoising only) under the model in the module docstring."""
    warmup = model.warmup_steps if warmup is None else warmup
    if world == 1:
        return model.steps * t_step
    tr = traffic(model, strategy, codec, world, text_mode, warmup=warmup_codec)
    comp, attn = rank_compute(model, tr, world, t_step)
    L = model.layers

    def cost(nbytes: float, msgs: int) -> float:
        bw = 0.0 if math.isinf(link.bandwidth) else nbytes / link.bandwidth
        return msgs * link.latency + bw

    total = 0.0
    w_steps = min(warmup, model.steps) if codec != "none" and not strategy.startswith("diffusers") else 0
    for step in range(model.steps):
        layer_bytes = tr["layer_warm"] if step < w_steps else tr["layer_coded"]
        worst = 0.0
        for r in range(world):
            layer_c = cost(layer_bytes[r], tr["layer_msgs"])
            gather_c = cost(tr["gather"][r], tr["gather_msgs"])
            if strategy == "ring":
                exposed = L * max(0.0, layer_c - attn[r] / L * (world - 1) / world)
            elif strategy == "distrifusion" and step >= stale_sync_steps:
                exposed = max(0.0, L * layer_c - comp[r])
            else:
                exposed = L * layer_c
            worst = max(worst, comp[r] + exposed + gather_c)
        total += worst
    return total


# -- rows ----------------------------------------------------------------------------------------------
def build_rows(models, strategies, codecs, worlds, links, step_times: dict, warmup_override: int | None = None,
               text_mode: str = "library", warmups=("fp16",)) -> list[dict]:
    rows = []
    for mk in models:
        m = MODELS[mk]
        t_step = step_times.get(mk) or default_step_time(m)
        warmup = m.warmup_steps if warmup_override is None else warmup_override
        ring_ref = {}
        for w in worlds:
            tr = traffic(m, "ring", "none", w, text_mode)
            ring_ref[w] = image_bytes(m, tr, "none", warmup)
        for strategy in strategies:
            for codec, warm in ((c, wu) for c in codecs for wu in (warmups if c != "none" else ("none",))):
                if strategy.startswith("diffusers") and codec != "none":
                    continue  # diffusers' native CP has no compression
                for w in worlds:
                    why = feasible(m, strategy, w)
                    if why:
                        continue
                    tr = traffic(m, strategy, codec, w, text_mode, warmup=warm)
                    ib = image_bytes(m, tr, codec, warmup)
                    rr = ring_ref[w]
                    row = {
                        "section": "bytes", "model": mk, "model_name": m.name, "strategy": strategy, "codec": codec,
                        "warmup": warm,
                        "world_size": w, "text_mode": "split" if tr["split_text"] else "replicated",
                        "steps": m.steps, "warmup_steps": warmup if codec != "none" else 0, "layers": m.layers,
                        "channels": m.channels, "tokens_per_rank": max(tr["tokens"]),
                        "bytes_per_step_warmup": round(ib["bytes_per_step_warmup"]),
                        "bytes_per_step": round(ib["bytes_per_step"]),
                        "bytes_per_step_uncompressed": round(ib["bytes_per_step_uncompressed"]),
                        "bytes_per_image": round(ib["bytes_per_image"]),
                        "bytes_per_image_max_rank": round(ib["bytes_per_image_max_rank"]),
                        "bytes_per_image_uncompressed": round(ib["bytes_per_image_uncompressed"]),
                        "compression_ratio": ib["bytes_per_image_uncompressed"] / ib["bytes_per_image"],
                        "compression_ratio_after_warmup": ib["bytes_per_step_uncompressed"] / ib["bytes_per_step"],
                        "step_fraction_of_ring": ib["bytes_per_step"] / rr["bytes_per_step"],
                        "image_bytes_vs_ring": rr["bytes_per_image"] / ib["bytes_per_image"],
                        "compute_step_s": t_step,
                        "single_device_s": m.steps * t_step,
                    }
                    for link in links:
                        row[f"latency_{link.key}_s"] = predict_latency(m, strategy, codec, w, link, t_step, warmup,
                                                                       text_mode, warmup_codec=warm)
                    rows.append(row)
    return rows


def published_rows() -> list[dict]:
    """Predicted vs published FLUX.1-dev 4-GPU latency (reference conventions: 256 text tokens split, warmup 1)."""
    m = MODELS["flux-dev-1024-t256"]
    rows = []
    for label, (strategy, codec, pub) in PUBLISHED["rows"].items():
        for (col, single, bw, lat), published in zip(PUBLISHED["columns"], pub):
            t_step = single / m.steps
            link = Link(col, col, bw, lat)
            if strategy is None:
                pred, byts, ratio = single, 0, 1.0
            else:
                pred = predict_latency(m, strategy, codec, 4, link, t_step, 1, text_mode="split")
                ib = image_bytes(m, traffic(m, strategy, codec, 4, "split"), codec, 1)
                byts, ratio = ib["bytes_per_image"], ib["bytes_per_image_uncompressed"] / ib["bytes_per_image"]
            rows.append({"section": "published", "model": m.key, "model_name": m.name, "method": label,
                         "strategy": strategy or "none", "codec": codec or "none",
                         "warmup": "fp16" if codec not in (None, "none") else "none", "world_size": 4 if strategy else 1,
                         "text_mode": "split", "link": col, "bytes_per_image": round(byts), "compression_ratio": ratio,
                         "predicted_s": pred, "published_s": published, "predicted_over_published": pred / published})
    return rows


# -- checks and report ---------------------------------------------------------------------------------
def headline_checks(rows: list[dict]) -> list[dict]:
    """The FLUX-scale claims: binary <= 1/15 of ring per step after warmup, >= 10x fewer bytes per image."""
    def find(model, strategy, codec, w, warmup="fp16"):
        warmup = "none" if codec == "none" else warmup
        for r in rows:
            if r["section"] == "bytes" and (r["model"], r["strategy"], r["codec"], r["world_size"], r["warmup"]) == \
                    (model, strategy, codec, w, warmup):
                return r
        return None
    out = []
    for mk in ("flux-dev-1024", "flux-dev-1024-t256"):
        b, ring = find(mk, "ring", "binary", 4), find(mk, "ring", "none", 4)
        if not b or not ring:
            continue
        m = MODELS[mk]
        rho = b["compression_ratio_after_warmup"]
        cap = m.steps / (b["warmup_steps"] + (m.steps - b["warmup_steps"]) / rho)
        out.append({"claim": f"{mk} W=4 ring: binary per step after warmup <= 1/15 of uncompressed ring",
                    "value": f"1/{ring['bytes_per_step'] / b['bytes_per_step']:.2f}",
                    "ok": b["bytes_per_step"] * 15 <= ring["bytes_per_step"]})
        out.append({"claim": f"{mk} W=4 ring: binary >= 10x fewer bytes per image, warmup counted "
                             f"(cap {cap:.2f}x = {m.steps}/(1 + {m.steps - 1}/{rho:.2f}))",
                    "value": f"{b['image_bytes_vs_ring']:.2f}x", "ok": b["image_bytes_vs_ring"] >= 10.0})
        bw = find(mk, "ring", "binary", 4, "int8")
        if bw:
            out.append({"claim": f"{mk} W=4 ring: binary with int8 warmup (warmup_codec='int8') >= 12.5x fewer bytes "
                                 "per image, warmup counted", "value": f"{bw['image_bytes_vs_ring']:.2f}x",
                        "ok": bw["image_bytes_vs_ring"] >= 12.5})
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:.3f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def markdown(rows: list[dict], pub: list[dict], checks: list[dict], links, worlds) -> str:
    from .plots import md_table
    lines = ["## Projected traffic and latency at real model shapes (`bench project`)", "",
             "Exact bytes from the codecs' `encoded_nbytes(N, C)` and each strategy's traffic pattern (no weights "
             "are loaded). Per rank, per image; warmup steps at full fp16/bf16 size; the output all-gather of every "
             "step included. compactfusion's plans keep text tokens whole on every rank (never sent; Wan, LTX and "
             "PixArt attend to text by cross-attention); diffusers' native CP and the reference split them when "
             "the length divides by W (`--text-mode split` models that for compactfusion too).", ""]
    shapes = [[m.name, m.layers, f"{m.heads}x{m.head_dim}", m.image_tokens, m.text_tokens, m.batch, m.steps,
               m.warmup_steps] for m in MODELS.values() if any(r["model"] == m.key for r in rows)]
    lines += [md_table(["model", "attn layers", "heads x dim", "image tokens", "text tokens", "batch", "steps",
                        "warmup"], shapes), ""]
    w0 = 4 if 4 in worlds else worlds[-1]
    lines += ["Patch, DistriFusion and ring move the same bytes (each rank's K/V reaches W-1 peers), so they share "
              "one column; DistriFusion only hides them behind compute.", ""]
    for mk in dict.fromkeys(r["model"] for r in rows):
        sel = {(r["strategy"], r["codec"]): r for r in rows if r["model"] == mk and r["world_size"] == w0
               and r["warmup"] in WARMUP_FULL}
        if not sel:
            continue
        name = next(iter(sel.values()))["model_name"]
        body = []
        for codec in dict.fromkeys(c for _, c in sel):
            ring, uly = sel.get(("ring", codec)), sel.get(("ulysses", codec))
            cells = [codec]
            cells += ([_gb(ring["bytes_per_step"]), _gb(ring["bytes_per_image"]), f"{ring['compression_ratio_after_warmup']:.2f}x",
                       f"{ring['compression_ratio']:.2f}x"] if ring else ["-"] * 4)
            cells += [_gb(uly["bytes_per_image"]), f"{uly['compression_ratio']:.2f}x"] if uly else ["-", "-"]
            body.append(cells)
        for peer in ("diffusers-ring", "diffusers-ulysses"):
            r = sel.get((peer, "none"))
            if r:
                body.append([f"{peer} (text {r['text_mode']})", _gb(r["bytes_per_step"]), _gb(r["bytes_per_image"]), "1.00x", "1.00x", "-", "-"])
        lines += [f"### {name}, W={w0} (bytes per rank)", "",
                  md_table(["codec", "ring/patch/DF per step (after warmup)", "ring/patch/DF per image",
                            "ratio after warmup", "ratio per image (warmup counted)", "ulysses per image", "ulysses ratio"],
                           body), ""]
    ws = sorted({r["world_size"] for r in rows})
    body = []
    for mk in dict.fromkeys(r["model"] for r in rows):
        for codec in ("none", "binary", "int2", "lowrank-int4:32", "lowrank-int4-bpe:1.1"):
            cells = [mk, codec]
            for w in ws:
                r = next((x for x in rows if (x["model"], x["strategy"], x["codec"], x["world_size"]) == (mk, "ring", codec, w)
                          and x["warmup"] in WARMUP_FULL), None)
                cells.append("-" if r is None else f"{_gb(r['bytes_per_image'])} ({r['compression_ratio']:.1f}x)")
            if len(cells) > 2 and any(c != "-" for c in cells[2:]):
                body.append(cells)
    if len(ws) > 1:
        lines += ["### Ring bytes per image per rank across world sizes (ratio vs uncompressed, warmup counted)", "",
                  md_table(["model", "codec"] + [f"W={w}" for w in ws], body), ""]
    lossy = [r for r in rows if r["strategy"] == "ring" and r["world_size"] == w0 and r["warmup"] not in WARMUP_FULL
             and r["codec"] in ("binary", "int2", "lowrank-int4-bpe:1.1")]
    if lossy:
        body = []
        for r in lossy:
            full = next((x for x in rows if (x["model"], x["strategy"], x["codec"], x["world_size"], x["warmup"]) ==
                         (r["model"], "ring", r["codec"], w0, "fp16")), None)
            body.append([r["model"], r["codec"], "fp16", _gb(full["bytes_per_image"]), f"{full['image_bytes_vs_ring']:.2f}x"]
                        if full else [r["model"], r["codec"], "fp16", "-", "-"])
            body.append([r["model"], r["codec"], r["warmup"], _gb(r["bytes_per_image"]), f"{r['image_bytes_vs_ring']:.2f}x"])
        seen, uniq = set(), []
        for b in body:
            if tuple(b[:3]) not in seen:
                seen.add(tuple(b[:3]))
                uniq.append(b)
        lines += [f"### Compressed warmup: ring, W={w0}, bytes per image per rank (warmup counted)", "",
                  "`warmup_codec` codes the warmup steps' raw activation lossily with error feedback from step 0 "
                  "(`CompressionConfig(warmup_codec=...)`, docs/wire-formats.md) instead of sending it at full "
                  "precision.", "",
                  md_table(["model", "codec", "warmup", "ring per image", "vs uncompressed ring"], uniq), ""]
    flux = [r for r in rows if r["model"] == "flux-dev-1024" and r["world_size"] == w0 and r["warmup"] in WARMUP_FULL]
    if flux:
        lines += [f"### Predicted seconds per image, FLUX.1-dev 1024x1024 (512 text tokens), W={w0}", "",
                  f"Single device: {flux[0]['single_device_s']:.2f} s ({flux[0]['compute_step_s']:.3f} s/step). "
                  "Model: per step `compute/W (FLOP share) + exposed communication` (see module docstring).", ""]
        body = [[r["strategy"], r["codec"]] + [f"{r[f'latency_{l.key}_s']:.2f}" for l in links] for r in flux]
        lines += [md_table(["strategy", "codec"] + [l.label for l in links], body), ""]
    if pub:
        cols = [c[0] for c in PUBLISHED["columns"]]
        lines += ["### Predicted vs published: FLUX.1-dev 1024x1024, 4 GPUs (reference table, section 8.2)", "",
                  "Reference conventions: 256 text tokens split over the ranks (N = 1088 per rank), 1 warmup step, "
                  "compute per step = the column's published single-device time / 28 (which includes text encoding "
                  "and VAE). PCIe assumed 25 GB/s effective, H20 NVLink 450 GB/s per direction; the Ethernet columns "
                  "are per-GPU MB/s (the reference's tc aggregate / 4). Cells: predicted / published seconds.", ""]
        body = []
        for label in PUBLISHED["rows"]:
            cells = [label]
            for col in cols:
                r = next(x for x in pub if x["method"] == label and x["link"] == col)
                cells.append(f"{r['predicted_s']:.2f} / {r['published_s']:.2f}")
            body.append(cells)
        lines += [md_table(["method"] + cols, body), ""]
        lines += ["Ratios predicted/published: " + ", ".join(
            f"{l}: {min(x['predicted_over_published'] for x in pub if x['method'] == l):.2f}-"
            f"{max(x['predicted_over_published'] for x in pub if x['method'] == l):.2f}" for l in PUBLISHED["rows"]) + ".",
            "PipeFusion (fastest in the reference's Ethernet columns) is not a compactfusion strategy and is not "
            "modelled.", ""]
    if checks:
        lines += ["### Headline checks (bytes)", "",
                  md_table(["claim", "value", "holds"], [[c["claim"], c["value"], "yes" if c["ok"] else "NO"] for c in checks]), ""]
    return "\n".join(lines)


def plots(rows: list[dict], links, out: Path) -> list[str]:
    from . import plots as P
    files = []
    w0 = 4
    sel = [r for r in rows if r["world_size"] == w0 and r["strategy"] == "ring" and r["warmup"] in WARMUP_FULL]
    if sel:
        files.append(P.grouped_bars(
            out / "project_bytes.png", groups=list(dict.fromkeys(r["model"] for r in sel)),
            series=list(dict.fromkeys(r["codec"] for r in sel)),
            value=lambda g, s: next((r["bytes_per_image"] / 1e9 for r in sel if r["model"] == g and r["codec"] == s), None),
            ylabel="GB sent per rank per image (ring, W=4)", title="Projected traffic per image", logy=True))
    flux = [r for r in rows if r["model"] == "flux-dev-1024" and r["world_size"] == w0 and r["warmup"] in WARMUP_FULL]
    finite = [l for l in links if not math.isinf(l.bandwidth)]
    if flux and finite:
        series = {}
        for r in flux:
            if r["codec"] in ("none", "binary", "int2", "lowrank-int4:32") and (r["codec"] == "none" or r["strategy"] in ("ring", "distrifusion")):
                pts = sorted(((l.bandwidth / 1e9, r[f"latency_{l.key}_s"]) for l in finite))
                series[f"{r['strategy']} {r['codec']}"] = pts
        files.append(P.lines(out / "project_latency_flux.png", series, xlabel="link bandwidth per rank (GB/s)",
                             ylabel="predicted s / image", title="FLUX.1-dev 1024^2, W=4 (model)", logx=True, logy=True,
                             hline=(flux[0]["single_device_s"], "single device")))
    return files


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="compactfusion bench project", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-out/project", help="output folder")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--worlds", default=",".join(map(str, WORLDS)))
    p.add_argument("--warmup-steps", type=int, default=None, help="override every model's compression warmup")
    p.add_argument("--warmup-codecs", default=",".join(WARMUPS),
                   help="what warmup steps send, comma list: fp16 (full precision) and/or codec specs (int8, int4, ...)")
    p.add_argument("--text-mode", choices=("library", "split", "replicated"), default="library",
                   help="library: text as each family plan has it (compactfusion), split for diffusers")
    p.add_argument("--step-time", action="append", default=[], metavar="MODEL=SECONDS",
                   help="single-device seconds per denoising step (default: FLOP-scaled from FLUX on L20)")
    p.add_argument("--quick", action="store_true", help="FLUX only, W=4, a few codecs (for tests)")
    p.add_argument("--no-plots", action="store_true")
    return p


def _split(s: str, allowed, what: str) -> list:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"--{what}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(map(str, allowed))}")
    return items


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    models = _split(a.models, MODELS, "models")
    strategies = _split(a.strategies, STRATEGIES, "strategies")
    codecs = [c.strip() for c in a.codecs.split(",") if c.strip()]
    from ._common import check_codec_specs, parse_worlds
    check_codec_specs(codecs)
    worlds = parse_worlds(a.worlds)
    warmups = [w.strip() for w in a.warmup_codecs.split(",") if w.strip()]
    if not warmups:
        raise UsageError("--warmup-codecs: give at least one of fp16, int8, int4, ...")
    check_codec_specs([w for w in warmups if w not in WARMUP_FULL])
    if a.warmup_steps is not None and a.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {a.warmup_steps}")
    step_times = {}
    for item in a.step_time:
        k, _, v = item.partition("=")
        if k not in MODELS:
            raise UsageError(f"--step-time: unknown model {k!r}")
        try:
            step_times[k] = float(v)
        except ValueError:
            raise UsageError(f"--step-time {item!r}: seconds must be a number") from None
        if step_times[k] <= 0:
            raise UsageError(f"--step-time {item!r}: seconds must be positive")
    if a.quick:
        models = [m for m in models if m.startswith("flux")][:1] or models[:1]
        codecs = [c for c in codecs if c in ("none", "binary", "int2", "lowrank-int4:32", "lowrank-int4-bpe:1.1")] or codecs[:2]
        worlds = [4] if 4 in worlds else worlds[:1]
        warmups = [w for w in warmups if w in ("fp16", "int8")] or warmups[:1]
    rows = build_rows(models, strategies, codecs, worlds, LINKS, step_times, a.warmup_steps, a.text_mode, warmups)
    pub = published_rows() if "flux-dev-1024-t256" in models or "flux-dev-1024" in models else []
    checks = headline_checks(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [] if a.no_plots else plots(rows, LINKS, out)
    md = markdown(rows, pub, checks, LINKS, worlds)
    md += "\n" + "\n".join(f"![{Path(f).stem}]({Path(f).name})" for f in files) + "\n" if files else ""
    from ._common import write_outputs
    write_outputs(out, rows + pub, md)
    print(f"bench project: {len(rows)} configurations, {len(pub)} published comparisons -> {out}/results.{{json,csv,md}}")
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['claim']}: {c['value']}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
