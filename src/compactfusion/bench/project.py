"""``compactfusion bench project``: exact bytes and predicted latency at real model shapes (no weights).

Bytes come from the codecs' ``encoded_nbytes(N, C)`` and each strategy's own traffic formula (its
``step_traffic``, named in ``parallel.registry``; every registry strategy with a formula is a row, the others
are listed as not modelled), so they are exact for this library's wire format. Per rank, per attention
layer, per denoising step:

* patch / distrifusion (and diffusers' native ring, which all-gathers K|V): the rank sends its K and V
  payloads to each of the W-1 peers;
* ring: W-1 hops; at hop s a rank forwards the (still compressed) payload that originated s ranks back;
* ulysses: all-to-all of q, k, v (each peer gets this rank's tokens x the peer's heads) and of the output
  o (each peer gets its own tokens x this rank's heads): (W-1)/W of the shard per tensor; with replicated
  text, the text output is all-gathered over heads (uncompressed);
* every step ends with an all-gather of the transformer output shard (uncompressed);
* pipefusion (M = W and 2W patches): the library's ``parallel.pipefusion.stage_traffic`` elements, coded per (patch, tensor) stream: stage s < W-1 sends its boundary (every image token once, plus
  for FLUX/SD3 the joint text once per step — ``pipefusion_text="first"``, the default — or once per patch
  under ``"every"``; rows carry ``pipefusion_text``), the last stage sends the output raw to the other W-1.

The matrix a stream codes is (batch * local tokens, heads * head_dim): the CFG batch is folded into N.
Warmup steps travel at full size in the model dtype (2 bytes: fp16/bf16). Text ("joint") tokens follow
each family's plan in compactfusion (``ModelSpec.library_text``): replicated on every rank (never sent,
compute repeated) in every built-in plan, or split like the image tokens (``--text-mode split``, unevenly
if need be); diffusers' context parallelism splits them only when the text length divides by W:
``text_mode`` says which applies.

Latency model (per step, per rank r, then the slowest rank; per image = sum over steps):

    t_step = compute_r + exposed_comm_r
    compute_r = t_single_step * flops_r / flops_total           (FLOP-proportional split)
    comm      = comm.link.link_cost(bytes, messages)  (the library's alpha-beta model, one outbound link per rank)
    exposed   = comm                                  overlap "none": patch, ulysses, diffusers-* (synchronous)
              = sum_layers max(0, comm_l - attn_l*(W-1)/W)   "attention": ring (hop s+1 hides behind block s)
              = max(0, comm - compute_r)              "step": distrifusion after its synchronous first step
    "pipeline", pipefusion: first step t_single_step + (W-1) boundary sends (synchronous, stage after stage); later steps
      (M+W-1) * (max(slot compute, slot send) + latency) + output send, a slot = one patch through one stage
      (the pipeline drains at every step, as compactfusion runs it; text recomputed by every patch pass)

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
from ..comm import link as linkmodel
from ..parallel.registry import REGISTRY, traffic_formula
from ..parallel.traffic import TrafficShape
from .peers import PEER_TRAFFIC

__all__ = ["MODELS", "LINKS", "ModelSpec", "Link", "traffic", "pipe_traffic", "predict_latency", "build_rows", "main",
           "STRATEGIES", "NOT_MODELLED"]

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
    # strategy="pipefusion": the family has built-in stages (plans.Stages); MMDiT text (text_tokens > 0) rides along
    pipefusion: bool = False
    # transformer parameters (all experts), counted on the meta device from diffusers' published configs
    # (``--count-params`` recounts them); 0 = not known. "other": embeddings, norms, projection (every stage).
    params_blocks: int = 0
    params_other: int = 0

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
    ModelSpec("flux-dev-1024", "FLUX.1-dev 1024x1024 (512 text tokens)", 57, 24, 128, 4096, 512, 1, 28, 1, 64, 24,
              pipefusion=True, params_blocks=11_837_283_328, params_other=64_124_992),
    ModelSpec("flux-dev-1024-t256", "FLUX.1-dev 1024x1024 (256 text tokens)", 57, 24, 128, 4096, 256, 1, 28, 1, 64, 24,
              pipefusion=True, params_blocks=11_837_283_328, params_other=64_124_992),
    ModelSpec("sd3-medium-1024", "SD3-medium 1024x1024 (CFG)", 24, 24, 64, 4096, 333, 2, 28, 1, 64, 24,
              pipefusion=True, params_blocks=2_008_851_456, params_other=19_476_544),
    ModelSpec("pixart-alpha-1024", "PixArt-alpha 1024x1024 (CFG)", 28, 16, 72, 4096, 0, 2, 20, 1, 32, 28),
    ModelSpec("cogvideox-2b", "CogVideoX-2b 480x720x49 (CFG)", 30, 30, 64, 17550, 226, 2, 50, 2, 64, 24),
    # Video at published shapes (diffusers class defaults; VAE 4x8x8, patch 1x2x2): Wan 2.1 14B and Wan 2.2
    # A14B (two experts of the same shape, one per step) at 720x1280x81 -> 21x45x80 tokens, text by
    # cross-attention, cond/uncond as two calls per step (batch 2 in traffic); HunyuanVideo 720x1280x129 ->
    # 33x45x80 tokens, 20 double + 40 single blocks, 256 text tokens replicated at the rear of attention.
    ModelSpec("wan21-14b-720p", "Wan 2.1 14B 720x1280x81 (CFG, 2 calls)", 40, 40, 128, 75600, 0, 2, 50, 1, 64, 23,
              pipefusion=True, params_blocks=14_055_772_160, params_other=232_719_424),
    ModelSpec("wan22-a14b-720p", "Wan 2.2 A14B 720x1280x81 (CFG, 2 calls)", 40, 40, 128, 75600, 0, 2, 40, 1, 64, 23,
              pipefusion=True, params_blocks=2 * 14_055_772_160, params_other=2 * 232_719_424),  # two experts
    ModelSpec("hunyuanvideo-720p", "HunyuanVideo 720x1280x129", 60, 24, 128, 118800, 256, 1, 50, 1, 64, 24,
              library_text="replicated"),
)}

_WAN14B = ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                         in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                         num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6))
#: Where ``params_blocks``/``params_other`` come from (``--count-params``): model key -> (diffusers class, its
#: published config, block prefixes, experts). Counted on the meta device: no weights are downloaded.
PARAM_SOURCES = {
    "flux-dev-1024": ("FluxTransformer2DModel", dict(num_layers=19, num_single_layers=38, guidance_embeds=True),
                      ("transformer_blocks", "single_transformer_blocks"), 1),
    "sd3-medium-1024": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                                      attention_head_dim=64, num_attention_heads=24,
                                                      joint_attention_dim=4096, caption_projection_dim=1536,
                                                      pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
                        ("transformer_blocks",), 1),
    "wan21-14b-720p": (*_WAN14B, ("blocks",), 1),
    "wan22-a14b-720p": (*_WAN14B, ("blocks",), 2),  # high- and low-noise experts of the 14B shape
}
PARAM_SOURCES["flux-dev-1024-t256"] = PARAM_SOURCES["flux-dev-1024"]


def count_params() -> list[dict]:
    """Recount every ``PARAM_SOURCES`` model on the meta device (imports diffusers: ~15 s on a small CPU)."""
    import diffusers
    import torch
    out = []
    for key, (cls, cfg, prefixes, experts) in PARAM_SOURCES.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**cfg)
        blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
        other = sum(p.numel() for p in model.parameters()) - blocks
        spec = MODELS[key]
        out.append({"model": key, "class": cls, "params_blocks": experts * blocks, "params_other": experts * other,
                    "matches_spec": (spec.params_blocks, spec.params_other) == (experts * blocks, experts * other),
                    "diffusers": diffusers.__version__})
    return out


#: Published single-device FLUX.1-dev time (reference table 8.2, "Original", 4xL20 machine): 28 steps.
FLUX_L20_S = 20.26
FLUX_L20_TEXT = 256  # the reference ran max_sequence_length=256


@dataclass(frozen=True)
class Link:
    key: str
    label: str
    bandwidth: float  # bytes/s per direction per rank (inf = unlimited)
    latency: float    # seconds per message

    def cost(self, nbytes: float, msgs: int) -> float:
        """Seconds for ``msgs`` messages of ``nbytes`` in all on one outbound link: the library's model."""
        return linkmodel.link_cost(nbytes, msgs, self.bandwidth, self.latency)


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

#: Every registry strategy with a traffic formula: the sequence-parallel ones, their peers (diffusers' native CP,
#: ``peers.PEER_TRAFFIC``), then the pipelines.
STRATEGIES = (tuple(n for n, spec in REGISTRY.items() if spec.traffic and spec.mesh != "pipe") + tuple(PEER_TRAFFIC)
              + tuple(n for n, spec in REGISTRY.items() if spec.traffic and spec.mesh == "pipe"))
#: Registry strategies without a formula: listed in the report as not modelled.
NOT_MODELLED = tuple(n for n, spec in REGISTRY.items() if not spec.traffic)
#: PipeFusion rows: M = factor x W patches per step (ParallelConfig.num_patches; M >= W).
PATCH_FACTORS = (1, 2)
PIPE_CODECS = ("none", "int8", "int4", "int2", "binary")
PIPE_TEXT = ("first", "every")  # ParallelConfig.pipefusion_text, for families with joint text
PUBLISHED_PIPE_CODECS = ("int4",)  # auto's floor for pipefusion boundaries (coarser codecs lose fidelity there)
CODECS = ("none", "int8", "int4", "int2", "binary", "lowrank:8", "lowrank-int4:32", "lowrank-int4-bpe:1.1")
#: What warmup steps send: full precision ("fp16": the model dtype, 2 bytes) or a lossy codec spec.
WARMUP_FULL = ("fp16", "none")
WARMUPS = ("fp16", "int8", "int4")
WORLDS = (2, 4, 8)

#: Reference latency table (section 8.2): FLUX.1-dev 1024^2, 28 steps, 4 GPUs, seconds. Its PipeFusion is
#: plain xDiT (degree 4, uncompressed); xDiT's patch count defaults to the degree (M = 4) [inferred].
PUBLISHED = {
    "columns": [("L20 PCIe", 20.26, 25e9, 5e-6), ("H20 NVLink", 23.16, 450e9, 2e-6), ("500MB", 28.06, 500e6, 0.0),
                ("1000MB", 28.06, 1000e6, 0.0), ("1500MB", 28.06, 1500e6, 0.0), ("2000MB", 28.06, 2000e6, 0.0)],
    "rows": {  # label -> (strategy, codec, published seconds per column)
        "Original": (None, None, (20.26, 23.16, 28.06, 28.06, 28.06, 28.06)),
        "Ring Attention": ("ring", "none", (7.54, 10.89, 136.52, 76.12, 58.31, 44.41)),
        "Compact-1bit": ("ring", "binary", (6.86, 7.46, 20.91, 15.74, 14.76, 13.89)),
        "Compact-2bit": ("ring", "int2", (6.70, 7.57, 27.48, 19.82, 17.76, 16.08)),
        "DistriFusion": ("distrifusion", "none", (6.86, 8.05, 139.73, 78.73, 58.41, 42.21)),
        "PipeFusion": ("pipefusion", "none", (9.07, 9.49, 12.42, 12.44, 12.43, 12.39)),
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


def _peer(strategy: str) -> bool:
    return strategy in PEER_TRAFFIC


def _pipeline(strategy: str) -> bool:
    """Pipeline strategies (stages over the world): M patches per step, 1/W of the blocks per rank."""
    return not _peer(strategy) and REGISTRY[strategy].mesh == "pipe"


def _formula(strategy: str):
    f = PEER_TRAFFIC.get(strategy) or (traffic_formula(strategy) if strategy in REGISTRY else None)
    if f is None:
        why = "has no traffic formula in parallel.registry" if strategy in REGISTRY else "is not a strategy"
        raise ValueError(f"strategy {strategy!r} {why}; modelled: {', '.join(STRATEGIES)}")
    return f


def traffic_shape(model: ModelSpec, strategy: str, world: int, text_mode: str = "library",
                  dtype_bytes: int = DTYPE_BYTES, patches: int | None = None,
                  pipefusion_text: str = "first") -> TrafficShape:
    m = world if patches is None else patches
    return TrafficShape(world=world, batch=model.batch, image_tokens=model.image_tokens, text_tokens=model.text_tokens,
                        heads=model.heads, head_dim=model.head_dim, out_channels=model.out_channels,
                        layers=model.layers, split_text=text_split(model, strategy, world, text_mode),
                        dtype_bytes=dtype_bytes, patches=patches,
                        text_passes=m if pipefusion_text == "every" else None)


def feasible(model: ModelSpec, strategy: str, world: int) -> str | None:
    """None, or why this (model, strategy, world) cannot run (the strategy's formula refuses the shape)."""
    if _pipeline(strategy) and not model.pipefusion:
        return "no built-in pipeline stages for this family"
    if model.image_tokens < world:
        return "fewer tokens than ranks"
    try:
        _formula(strategy)(traffic_shape(model, strategy, world), lambda n, c: 0)
    except ValueError as e:
        return str(e)
    return None


def traffic(model: ModelSpec, strategy: str, codec: str, world: int, text_mode: str = "library",
            dtype_bytes: int = DTYPE_BYTES, warmup: str = "fp16", patches: int | None = None,
            pipefusion_text: str = "first") -> dict:
    """Per-rank bytes and messages of one denoising step, for a warmup step and for a coded step.

    The strategy's own formula (``parallel.registry.traffic_formula``; peers: ``peers.PEER_TRAFFIC``) priced at
    the codec's ``encoded_nbytes``. ``warmup``: what a compression warmup step sends, "fp16" (full precision in
    the model dtype) or a codec spec (``CompressionConfig.warmup_codec``, e.g. "int8"): the raw activation coded
    lossily. ``patches``: a pipeline strategy's M (None = W); ``pipefusion_text``: its joint text in the
    first pass of each step ("first", the default) or in every pass ("every").

    Returns lists indexed by rank: ``layer_warm``/``layer_coded`` (bytes one layer sends; pipeline: one
    boundary, ``layers`` = 1), ``layer_raw`` (uncompressed equivalent), ``layer_msgs``; ``gather`` (bytes sent
    once per step, raw) and ``gather_msgs``; plus ``tokens`` (N of this rank's stream), ``split_text``,
    ``text_mode``, ``overlap`` (what the sends may hide behind) and, for pipelines, ``slot_warm``/``slot_coded``.
    """
    f = _formula(strategy)
    shape = traffic_shape(model, strategy, world, text_mode, dtype_bytes, patches, pipefusion_text)
    coded_spec = codec if codec != "none" and not _peer(strategy) else "none"
    warm_spec = warmup if coded_spec != "none" and warmup not in WARMUP_FULL else "none"

    def priced(spec: str):
        return f(shape, lambda n, c: encoded_nbytes(spec, n, c, dtype_bytes))

    warm, coded, raw = priced(warm_spec), priced(coded_spec), priced("none")
    out = {"layer_warm": list(warm.layer), "layer_coded": list(coded.layer), "layer_raw": list(raw.layer),
           "layer_msgs": coded.layer_msgs, "gather": list(coded.gather), "gather_msgs": coded.gather_msgs,
           "tokens": list(coded.tokens), "split_text": coded.text == "split", "text_mode": coded.text,
           "overlap": coded.overlap, "image_shards": shape.image_shards(), "text_shards": shape.text_shards()}
    if coded.units is not None:
        out["layers"] = coded.units
    if coded.patch_sizes:
        out.update(slot_warm=warm.slot, slot_coded=coded.slot, patch_sizes=list(coded.patch_sizes))
    return out


def pipe_traffic(model: ModelSpec, codec: str, world: int, patches: int, dtype_bytes: int = DTYPE_BYTES,
                 warmup: str = "fp16") -> dict:
    """``traffic`` of strategy="pipefusion" with M = ``patches`` (``parallel.pipefusion.step_traffic``)."""
    return traffic(model, "pipefusion", codec, world, dtype_bytes=dtype_bytes, warmup=warmup, patches=patches)


def image_bytes(model: ModelSpec, tr: dict, codec: str, warmup: int) -> dict:
    """Per-rank bytes of one image from a ``traffic`` (or ``pipe_traffic``) dict (mean and max over ranks)."""
    L, S = tr.get("layers", model.layers), model.steps
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
                    warmup_codec: str = "fp16", num_patches: int | None = None, pipefusion_text: str = "first") -> float:
    """Seconds per image (denoising only) under the model in the module docstring.

    ``num_patches``: PipeFusion's M (None = W); ``stale_sync_steps``: DistriFusion's and PipeFusion's
    synchronous first steps.
    """
    warmup = model.warmup_steps if warmup is None else warmup
    if world == 1:
        return model.steps * t_step
    tr = traffic(model, strategy, codec, world, text_mode, warmup=warmup_codec, patches=num_patches or None,
                 pipefusion_text=pipefusion_text)
    if tr["overlap"] == "pipeline":
        return _pipefusion_latency(model, tr, codec, world, link, t_step, warmup, stale_sync_steps)
    comp, attn = rank_compute(model, tr, world, t_step)
    L = model.layers

    total = 0.0
    w_steps = min(warmup, model.steps) if codec != "none" and not _peer(strategy) else 0
    for step in range(model.steps):
        layer_bytes = tr["layer_warm"] if step < w_steps else tr["layer_coded"]
        worst = 0.0
        for r in range(world):
            layer_c = link.cost(layer_bytes[r], tr["layer_msgs"])
            gather_c = link.cost(tr["gather"][r], tr["gather_msgs"])
            if tr["overlap"] == "attention":
                exposed = L * max(0.0, layer_c - attn[r] / L * (world - 1) / world)
            elif tr["overlap"] == "step" and step >= stale_sync_steps:
                exposed = max(0.0, L * layer_c - comp[r])
            else:
                exposed = L * layer_c
            worst = max(worst, comp[r] + exposed + gather_c)
        total += worst
    return total


def pipe_slot_compute(model: ModelSpec, tr: dict, world: int, t_step: float) -> float:
    """Seconds of a mean PipeFusion slot: the largest patch's queries through one stage (1/W of the blocks), plus
    the joint text's share — computed in every pass ("carried") or in one pass per step ("carried once") —
    over the whole image's K/V."""
    s = model.image_tokens + model.text_tokens
    lin, att = model.flops(s, s)
    share = {"carried": 1.0, "carried once": 1.0 / len(tr["patch_sizes"])}.get(tr["text_mode"], 0.0)
    q = tr["patch_sizes"][0] + model.text_tokens * share
    l_p, a_p = model.flops(q, s)
    return t_step * (l_p + a_p) / (lin + att) / world


def _pipefusion_latency(model: ModelSpec, tr: dict, codec: str, world: int, link: Link, t_step: float, warmup: int,
                        sync_steps: int) -> float:
    """PipeFusion as compactfusion runs it (the pipeline drains at every step; see the module docstring)."""
    w, patches = world, len(tr["patch_sizes"])
    slot_compute = pipe_slot_compute(model, tr, w, t_step)
    out_c = link.cost(tr["gather"][-1], tr["gather_msgs"])  # the last stage's output to the others, after the step
    w_steps = min(warmup, model.steps) if codec != "none" else 0
    total = 0.0
    for step in range(model.steps):
        warm = step < w_steps
        if step < sync_steps:  # whole image stage after stage; each boundary's M payloads wait for its stage
            bnd = tr["layer_warm" if warm else "layer_coded"][0]
            total += t_step + (w - 1) * link.cost(bnd, tr["layer_msgs"]) + out_c
        else:  # M + W - 1 slots; a stage sends patch p while computing p + 1
            send = link.cost(tr["slot_warm" if warm else "slot_coded"], 0)
            total += (patches + w - 1) * (max(slot_compute, send) + link.latency) + out_c
    return total


# -- rows ----------------------------------------------------------------------------------------------
def patch_counts(strategy: str, world: int) -> list:
    """PipeFusion's M values for the rows (``PATCH_FACTORS`` x W); [None] for the other strategies."""
    return [f * world for f in PATCH_FACTORS] if _pipeline(strategy) else [None]


def param_bytes(model: ModelSpec, strategy: str, world: int, dtype_bytes: int = DTYPE_BYTES) -> int | None:
    """Transformer weights one rank holds (model dtype): PipeFusion keeps 1/W of the blocks (its stages are
    balanced by parameter count, so within one block of 1/W) plus the replicated embeddings and output
    layers; every other strategy holds the whole model. None when the spec has no parameter counts."""
    if not model.params_blocks:
        return None
    blocks = model.params_blocks / world if _pipeline(strategy) else model.params_blocks
    return round((blocks + model.params_other) * dtype_bytes)


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
                if _peer(strategy) and codec != "none":
                    continue  # diffusers' native CP has no compression
                if _pipeline(strategy) and (codec not in PIPE_CODECS or warm not in WARMUP_FULL + ("none",)):
                    continue  # the boundary codecs measured in docs/models.md, full-precision synchronous step
                texts = PIPE_TEXT if _pipeline(strategy) and m.text_tokens else (None,)  # joint text: both modes
                for w, patches, ptext in ((w, p, t) for w in worlds for p in patch_counts(strategy, w) for t in texts):
                    why = feasible(m, strategy, w)
                    if why:
                        continue
                    tr = traffic(m, strategy, codec, w, text_mode, warmup=warm, patches=patches,
                                 pipefusion_text=ptext or "first")
                    ib = image_bytes(m, tr, codec, warmup)
                    rr = ring_ref[w]
                    row = {
                        "section": "bytes", "model": mk, "model_name": m.name, "strategy": strategy, "codec": codec,
                        "warmup": warm, "num_patches": patches, "pipefusion_text": ptext,
                        "world_size": w, "text_mode": tr.get("text_mode") or ("split" if tr["split_text"] else "replicated"),
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
                        "param_bytes_per_rank": param_bytes(m, strategy, w),
                    }
                    if patches:  # below this bandwidth a slot waits for its send rather than its compute
                        row["link_bound_below_Bps"] = tr["slot_coded"] / pipe_slot_compute(m, tr, w, t_step)
                    for link in links:
                        row[f"latency_{link.key}_s"] = predict_latency(m, strategy, codec, w, link, t_step, warmup,
                                                                       text_mode, warmup_codec=warm, num_patches=patches,
                                                                       pipefusion_text=ptext or "first")
                    rows.append(row)
    return rows


def published_rows() -> list[dict]:
    """Predicted vs published FLUX.1-dev 4-GPU latency (reference conventions: 256 text tokens split, warmup 1)."""
    m = MODELS["flux-dev-1024-t256"]
    rows = []
    # the published methods, then compactfusion's compressed PipeFusion (predicted only) under the same conventions
    methods = [(label, s, c, pub, 4, "first") for label, (s, c, pub) in PUBLISHED["rows"].items()]
    methods += [(f"PipeFusion + {c}, M={mp}, text {t} (compactfusion)", "pipefusion", c,
                 (None,) * len(PUBLISHED["columns"]), mp, t)
                for c in PUBLISHED_PIPE_CODECS for mp in (4, 8) for t in PIPE_TEXT]
    for label, strategy, codec, pub, patches, ptext in methods:
        for (col, single, bw, lat), published in zip(PUBLISHED["columns"], pub):
            t_step = single / m.steps
            link = Link(col, col, bw, lat)
            pipe = strategy is not None and _pipeline(strategy)
            if strategy is None:
                pred, byts, ratio = single, 0, 1.0
            else:
                pred = predict_latency(m, strategy, codec, 4, link, t_step, 1, text_mode="split",
                                       num_patches=patches if pipe else None, pipefusion_text=ptext)
                tr = traffic(m, strategy, codec, 4, "split", patches=patches if pipe else None, pipefusion_text=ptext)
                ib = image_bytes(m, tr, codec, 1)
                byts, ratio = ib["bytes_per_image"], ib["bytes_per_image_uncompressed"] / ib["bytes_per_image"]
            rows.append({"section": "published", "model": m.key, "model_name": m.name, "method": label,
                         "strategy": strategy or "none", "codec": codec or "none",
                         "warmup": "fp16" if codec not in (None, "none") else "none", "world_size": 4 if strategy else 1,
                         "num_patches": patches if pipe else None, "pipefusion_text": ptext if pipe else None,
                         "text_mode": ("carried" if ptext == "every" else "carried once") if pipe else "split", "link": col, "bytes_per_image": round(byts),
                         "compression_ratio": ratio, "predicted_s": pred, "published_s": published,
                         "predicted_over_published": None if published is None else pred / published})
    return rows


# -- checks and report ---------------------------------------------------------------------------------
def headline_checks(rows: list[dict], pub=()) -> list[dict]:
    """The FLUX-scale claims: binary <= 1/15 of ring per step after warmup, >= 10x fewer bytes per image; and
    PipeFusion's (``pipefusion_checks``; ``pub``: ``published_rows()``, for the reference-conventions one)."""
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
    out += pipefusion_checks(rows, pub)
    return out


def pipefusion_checks(rows: list[dict], pub=()) -> list[dict]:
    """FLUX.1-dev 1024^2, W=4, 500 MB/s per GPU: compressed PipeFusion (int4, its best M) against the published
    PipeFusion and against the best compressed ring prediction at the same link."""
    col, published = "500MB", PUBLISHED["rows"]["PipeFusion"][2][2]
    key = "latency_500mbs_s"
    sel = [r for r in rows if r["section"] == "bytes" and r["model"] == "flux-dev-1024" and r["world_size"] == 4
           and key in r and r["warmup"] in WARMUP_FULL]
    pipe = [r for r in sel if r["strategy"] == "pipefusion" and r["codec"] == "int4" and r["pipefusion_text"] == "first"]
    ring = [r for r in sel if r["strategy"] == "ring" and r["codec"] != "none"]
    out = []
    if pipe:
        p = min(pipe, key=lambda r: r[key])
        every = [r for r in sel if r["strategy"] == "pipefusion" and r["codec"] == "int4"
                 and r["pipefusion_text"] == "every" and r["num_patches"] == p["num_patches"]]
        what = (f"flux-dev-1024 W=4, 500 MB/s: pipefusion + int4 (M={p['num_patches']}, text in the first pass; "
                + (f"every pass: {every[0][key]:.2f} s" if every else "") + ") predicted")
        out.append({"claim": f"{what} < published PipeFusion {published:.2f} s (reference 8.2; its compute baseline "
                             f"28.06 s, ours {p['single_device_s']:.2f} s)",
                    "value": f"{p[key]:.2f} s", "ok": p[key] < published})
        if ring:
            b = min(ring, key=lambda r: r[key])
            out.append({"claim": f"{what} < best compressed ring predicted (ring + {b['codec']}: {b[key]:.2f} s)",
                        "value": f"{p[key]:.2f} s", "ok": p[key] < b[key]})
    ref = [r for r in pub if r["strategy"] == "pipefusion" and r["codec"] == "int4" and r["link"] == col
           and r["pipefusion_text"] == "first"]
    if ref:
        p = min(ref, key=lambda r: r["predicted_s"])
        out.append({"claim": f"reference conventions (256 text tokens, 28.06 s single device), W=4, 500 MB/s: "
                             f"pipefusion + int4 (M={p['num_patches']}) predicted < published PipeFusion {published:.2f} s",
                    "value": f"{p['predicted_s']:.2f} s", "ok": p["predicted_s"] < published})
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
    if NOT_MODELLED:
        lines += [not_modelled_line(), ""]
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
        body = [[_label(r), r["codec"]] + [f"{r[f'latency_{l.key}_s']:.2f}" for l in links] for r in flux]
        lines += [md_table(["strategy", "codec"] + [l.label for l in links], body), ""]
    if pub:
        cols = [c[0] for c in PUBLISHED["columns"]]
        lines += ["### Predicted vs published: FLUX.1-dev 1024x1024, 4 GPUs (reference table, section 8.2)", "",
                  "Reference conventions: 256 text tokens split over the ranks (N = 1088 per rank), 1 warmup step, "
                  "compute per step = the column's published single-device time / 28 (which includes text encoding "
                  "and VAE). PCIe assumed 25 GB/s effective, H20 NVLink 450 GB/s per direction; the Ethernet columns "
                  "are per-GPU MB/s (the reference's tc aggregate / 4). Cells: predicted / published seconds.", ""]
        body = []
        for label in dict.fromkeys(x["method"] for x in pub):
            cells = [label]
            for col in cols:
                r = next(x for x in pub if x["method"] == label and x["link"] == col)
                cells.append(f"{r['predicted_s']:.2f} / " + ("-" if r["published_s"] is None else f"{r['published_s']:.2f}"))
            body.append(cells)
        lines += [md_table(["method"] + cols, body), ""]
        lines += ["Ratios predicted/published: " + ", ".join(
            f"{l}: {min(x['predicted_over_published'] for x in pub if x['method'] == l):.2f}-"
            f"{max(x['predicted_over_published'] for x in pub if x['method'] == l):.2f}" for l in PUBLISHED["rows"]) + ".",
            "PipeFusion rows are predicted with compactfusion's own schedule (`strategy=\"pipefusion\"`, M patches, "
            "joint text in the first patch pass of each step unless the row says every pass (`pipefusion_text`), the "
            "pipeline drained at every step: bubble (W-1)/(M+W-1)), uncompressed "
            "for the reference's row (plain xDiT, M = 4 inferred) and int4 for ours. xDiT steps the scheduler per patch "
            "inside its loop, so its pipeline need not drain between steps; that is the main reason our prediction is "
            "above its published time. At these links PipeFusion is compute-bound (a slot's boundary payload takes "
            "less time to send than to compute), so the codec changes its bytes, not its predicted time.", ""]
    pipe = [r for r in rows if r["strategy"] == "pipefusion" and r["world_size"] == w0]
    if pipe:
        lines += _pipefusion_markdown(pipe, rows, links, w0)
    if checks:
        lines += ["### Headline checks", "",
                  md_table(["claim", "value", "holds"], [[c["claim"], c["value"], "yes" if c["ok"] else "NO"] for c in checks]), ""]
    return "\n".join(lines)


def _label(r: dict) -> str:
    if not r.get("num_patches"):
        return r["strategy"]
    return f"{r['strategy']} M={r['num_patches']}" + (f" text {r['pipefusion_text']}" if r.get("pipefusion_text") else "")


def _pipefusion_markdown(pipe: list[dict], rows: list[dict], links, w0: int) -> list[str]:
    from .plots import md_table
    lines = [f"### PipeFusion (`strategy=\"pipefusion\"`), W={w0}: bytes, weights and predicted seconds per image", "",
             "Traffic from `parallel.pipefusion.stage_traffic` (each boundary carries every image token once per step "
             "plus, for FLUX and SD3, the text once per step in the first pass, or once per patch with text \"every\"; the "
             "last stage sends the output raw to the others), "
             "coded per (patch, tensor) stream with the codec's `encoded_nbytes`; the synchronous first step at fp16. "
             "Bytes per rank are the mean over the W stages (the last stage sends only the output: \"busiest\" is the "
             "largest). Latency: the synchronous step runs the whole image stage after stage (each boundary's send "
             "exposed); every later step is M + W - 1 slots of `max(slot compute, slot send) + latency`, a slot being "
             "one patch through one stage (1/W of the blocks; MMDiT text runs in one pass per step, or in every pass "
             "with text \"every\", its compute then repeated M times per step), then the output send. Weights per rank: 1/W of the blocks plus the "
             "replicated embeddings and output layers, fp16/bf16 (parameter counts from diffusers' published configs, "
             "`bench project --count-params`); the other strategies hold the whole transformer.", ""]
    ring = {(r["model"]): r for r in rows if r["strategy"] == "ring" and r["codec"] == "none" and r["world_size"] == w0}
    body = []
    for r in pipe:
        full = ring.get(r["model"])
        mem = r.get("param_bytes_per_rank")
        body.append([r["model"], r["codec"], r["num_patches"], r.get("pipefusion_text") or "-", _gb(r["bytes_per_image"]), _gb(r["bytes_per_image_max_rank"]),
                     f"{r['image_bytes_vs_ring']:.0f}x", f"{r['compression_ratio']:.2f}x",
                     "-" if mem is None else f"{mem / 1e9:.2f} GB" + ("" if not full or not full.get("param_bytes_per_rank")
                                                                     else f" (of {full['param_bytes_per_rank'] / 1e9:.2f})"),
                     f"{r['link_bound_below_Bps'] / 1e6:.0f}"])
    lines += [md_table(["model", "codec", "M", "text", "bytes/image/rank (mean)", "busiest rank", "fewer than uncompressed ring",
                        "ratio vs uncompressed pipefusion", "weights/rank", "link-bound below (MB/s)"], body), ""]
    body = [[r["model"], r["codec"], r["num_patches"], r.get("pipefusion_text") or "-"]
            + [f"{r[f'latency_{l.key}_s']:.2f}" for l in links] for r in pipe]
    lines += [f"Predicted seconds per image (W={w0}); single device: " + ", ".join(
        f"{mk} {next(r['single_device_s'] for r in pipe if r['model'] == mk):.2f} s" for mk in dict.fromkeys(r["model"] for r in pipe))
        + ".", "", md_table(["model", "codec", "M", "text"] + [l.label for l in links], body), ""]
    return lines


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
        def wanted(r):
            if r["strategy"] == "pipefusion":  # M = W, the default text mode
                return r["codec"] in ("none", "int4") and r["num_patches"] == w0 and r["pipefusion_text"] == "first"
            return r["codec"] == "none" or (r["strategy"] in ("ring", "distrifusion")
                                            and r["codec"] in ("binary", "int2", "lowrank-int4:32"))
        for r in filter(wanted, flux):
            series[f"{_label(r)} {r['codec']}"] = sorted(((l.bandwidth / 1e9, r[f"latency_{l.key}_s"]) for l in finite))
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
    p.add_argument("--count-params", action="store_true",
                   help="recount the specs' parameter counts from diffusers' configs (meta device) and exit")
    return p


def not_modelled_line() -> str:
    return ("Not modelled (registry strategies without a traffic formula, `parallel/registry.py`): "
            + ", ".join(NOT_MODELLED) + ".")


def _split(s: str, allowed, what: str) -> list:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"--{what}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(map(str, allowed))}")
    return items


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.count_params:
        counts = count_params()
        for c in counts:
            print(f"  [{'ok' if c['matches_spec'] else 'FAIL'}] {c['model']} ({c['class']}, diffusers {c['diffusers']}): "
                  f"blocks {c['params_blocks']:,}, other {c['params_other']:,}")
        return 0 if all(c["matches_spec"] for c in counts) else 1
    models = _split(a.models, MODELS, "models")
    unmodelled = [x.strip() for x in a.strategies.split(",") if x.strip() in NOT_MODELLED]
    if unmodelled:
        raise UsageError(f"--strategies: {', '.join(unmodelled)} not modelled (no traffic formula in "
                         f"parallel/registry.py); choose from {', '.join(STRATEGIES)}")
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
        codecs = [c for c in codecs if c in ("none", "int4", "binary", "int2", "lowrank-int4:32", "lowrank-int4-bpe:1.1")] \
            or codecs[:2]
        worlds = [4] if 4 in worlds else worlds[:1]
        warmups = [w for w in warmups if w in ("fp16", "int8")] or warmups[:1]
    rows = build_rows(models, strategies, codecs, worlds, LINKS, step_times, a.warmup_steps, a.text_mode, warmups)
    pub = published_rows() if "flux-dev-1024-t256" in models or "flux-dev-1024" in models else []
    checks = headline_checks(rows, pub)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [] if a.no_plots else plots(rows, LINKS, out)
    md = markdown(rows, pub, checks, LINKS, worlds)
    md += "\n" + "\n".join(f"![{Path(f).stem}]({Path(f).name})" for f in files) + "\n" if files else ""
    from ._common import write_outputs
    write_outputs(out, rows + pub, md)
    print(f"bench project: {len(rows)} configurations, {len(pub)} published comparisons -> {out}/results.{{json,csv,md}}")
    if NOT_MODELLED:
        print(f"  {not_modelled_line()}")
    for c in checks:
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['claim']}: {c['value']}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
