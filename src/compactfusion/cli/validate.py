"""Checks that run before any worker starts (well under 2 s; no weights loaded, no network).

Everything a user can get wrong that is knowable from the flags and the files on disk ends here in a
``UsageError`` (one line, exit 2): the model folder's layout, degrees vs world size and head count, size
caps, the output folder, and a link model that would sleep past ``--timeout``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from .args import UsageError
from .config import BUNDLED_MARKER, MAX_LOCAL_PROCS, MAX_NODES, RDZV_TIMEOUT_RANGE_S, check_finite_flags

#: Caps on sizes: beyond these a run would end in MemoryError/OverflowError deep inside torch.
MAX_STEPS = 10_000
MAX_SIDE = 8_192  # pixels per side
MAX_IMAGES = 64  # images per prompt
MAX_PROMPT_CHARS = 10_000
#: Files of a run that a re-run into the same folder would mix with its own.
RESULT_GLOBS = ("report.json", "image_*.png", "reference_*.png", "video_*.gif", "reference_*.gif")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a 100,000-character prompt is not echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}...({len(text):,} chars)"


class ModelInfo(NamedTuple):
    kind: str  # "digits", "video-digits", "diffusers" or "hub"
    path: Path | None
    pipeline_class: str
    heads: int | None  # the transformer's attention heads, when its config.json says


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(any(folder.glob(g)) for g in _WEIGHTS)


def _heads(config: Path) -> int | None:
    try:
        v = json.loads(config.read_text()).get("num_attention_heads")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and v > 0 else None


def inspect_model(model: str | None) -> ModelInfo:
    """What ``--model`` names, from files only. A string that exists on disk is always a local folder (never
    resolved against the network); a hub id must already be in the local cache."""
    if model == "bundled:video-digits":
        from ..bundled.video_digits import BUNDLED_VIDEO_DIR, MARKER
        if not (BUNDLED_VIDEO_DIR / MARKER).is_file():
            raise UsageError("the bundled video-digits model is not installed; pass --model DIR (a video-digits "
                             "folder) or create it with `compactfusion train-video-digits --out DIR`")
        return _video_digits(BUNDLED_VIDEO_DIR, "bundled video-digits model")
    if model is None or model == "bundled:digits":
        if not BUNDLED_MARKER.is_file():
            raise UsageError("the bundled digits model is not installed; pass --model DIR (a diffusers or digits "
                             "folder) or create it with `compactfusion train-digits --out DIR`")
        return _digits(BUNDLED_MARKER.parent, "bundled digits model")
    if not model.strip():
        raise UsageError("--model is empty; leave it out for the bundled digits model, or pass a folder or hub id")
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--model {short(model)} is a file; pass the pipeline's folder")
        if (path / "digits_pipeline.json").is_file():
            return _digits(path, f"--model {short(model)}")
        if (path / "video_digits_pipeline.json").is_file():
            return _video_digits(path, f"--model {short(model)}")
        if (path / "model_index.json").is_file():
            return _diffusers(path, model)
        raise UsageError(f"--model folder {short(model)} has neither model_index.json (a diffusers pipeline) nor "
                         f"digits_pipeline.json (a digits model); pass the folder that contains one")
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/") and model.count("/") != 1:
        raise UsageError(f"--model folder {short(model)} does not exist")
    if not _HUB_ID.match(model):
        raise UsageError(f"--model {short(model)} is neither a local folder nor a hub id (owner/name)")
    from huggingface_hub import try_to_load_from_cache
    index = try_to_load_from_cache(model, "model_index.json")
    if not isinstance(index, str):  # None or the "known missing" sentinel
        raise UsageError(f"--model {short(model)} is not a local folder and not in the local Hugging Face cache; "
                         f"compactfusion never downloads: fetch it first or pass a folder")
    return _diffusers(Path(index).parent, model, kind="hub")


def _digits(path: Path, what: str) -> ModelInfo:
    needed = [("transformer", "config.json"), ("label_embedder", "config.json"), ("scheduler", "scheduler_config.json")]
    missing = [f"{d}/{f}" for d, f in needed if not (path / d / f).is_file()]
    missing += [f"{d}/ weights" for d in ("transformer", "label_embedder") if not _has_weights(path / d)]
    if missing:
        raise UsageError(f"{what} is an incomplete digits folder (missing {', '.join(missing)}); save one with "
                         f"`compactfusion train-digits --out DIR`")
    return ModelInfo("digits", path, "DigitsPipeline", _heads(path / "transformer" / "config.json"))


def _video_digits(path: Path, what: str) -> ModelInfo:
    needed = ["video_digits_pipeline.json", "transformer/config.json", "label_embedder/config.json",
              "scheduler/scheduler_config.json"]
    missing = [f for f in needed if not (path / f).is_file()]
    missing += [f"{d}/ weights" for d in ("transformer", "label_embedder") if not _has_weights(path / d)]
    if missing:
        raise UsageError(f"{what} is an incomplete video-digits folder (missing {', '.join(missing)}); save one with "
                         f"`compactfusion train-video-digits --out DIR`")
    return ModelInfo("video-digits", path, "VideoDigitsPipeline", _heads(path / "transformer" / "config.json"))


def _diffusers(path: Path, model: str, kind: str = "diffusers") -> ModelInfo:
    index = path / "model_index.json"
    try:
        info = json.loads(index.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: cannot read {short(str(index))}: {str(e).splitlines()[0][:80]}") from None
    cls = str(info.get("_class_name", "?"))[:60]
    if "transformer" not in info:
        raise UsageError(f"--model {short(model)} is a {cls} without a `transformer` component; compactfusion runs "
                         f"diffusion-transformer pipelines (Flux, SD3, PixArt, ...), not UNet pipelines")
    if kind == "diffusers":  # a cached hub snapshot may hold only some files; the workers report those
        parts = [k for k, v in info.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                 and v[0] is not None]
        missing = [k for k in parts if not (path / k).is_dir()]
        if missing:
            raise UsageError(f"--model {short(model)}: model_index.json lists components without a folder "
                             f"({', '.join(missing[:5])}); pass a complete diffusers folder")
        t = path / "transformer"
        if not (t / "config.json").is_file() or not _has_weights(t):
            raise UsageError(f"--model {short(model)}: transformer/ has no config.json or no weights "
                             f"(*.safetensors / *.bin); pass a complete diffusers folder")
    return ModelInfo(kind, path, cls, _heads(path / "transformer" / "config.json"))


def check_sizes(a) -> None:
    """Caps that keep a typo from ending in MemoryError/OverflowError minutes in."""
    check_finite_flags(a, ("guidance_scale", "delta_decay", "timeout"))
    for name, cap in (("steps", MAX_STEPS), ("num_images", MAX_IMAGES), ("height", MAX_SIDE), ("width", MAX_SIDE)):
        v = getattr(a, name, None)
        if v is not None and v > cap:
            raise UsageError(f"--{name.replace('_', '-')} {v} is above the limit of {cap:,}")
    prompt = getattr(a, "prompt", None)
    if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
        raise UsageError(f"--prompt has {len(prompt):,} characters, above the limit of {MAX_PROMPT_CHARS:,}")


def check_launch(a) -> None:
    if a.nproc is not None and not 1 <= a.nproc <= MAX_LOCAL_PROCS:
        raise UsageError(f"--nproc must be between 1 and {MAX_LOCAL_PROCS}, got {a.nproc}")
    if not 1 <= a.nnodes <= MAX_NODES:
        raise UsageError(f"--nnodes must be between 1 and {MAX_NODES}, got {a.nnodes}")
    if a.nnodes > 1 and not a.rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if a.rdzv_endpoint is not None:
        host, _, port = a.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--rdzv-endpoint {short(a.rdzv_endpoint)} must be HOST:PORT with a port in 1..65535")
    if a.nnodes > 1 and a.rdzv_backend == "static" and a.node_rank is None:
        raise UsageError("--rdzv-backend static with --nnodes > 1 needs --node-rank on every node")
    if a.node_rank is not None and not 0 <= a.node_rank < a.nnodes:
        raise UsageError(f"--node-rank must be between 0 and --nnodes - 1 ({a.nnodes - 1}), got {a.node_rank}")
    check_finite_flags(a, ("rdzv_timeout",))
    lo, hi = RDZV_TIMEOUT_RANGE_S
    if not lo <= a.rdzv_timeout <= hi:
        raise UsageError(f"--rdzv-timeout must be between {lo:g} and {hi:g} seconds, got {a.rdzv_timeout:g}")


def existing_results(out: Path) -> list[Path]:
    return sorted(p for g in RESULT_GLOBS for p in out.glob(g)) if out.is_dir() else []


def check_output(a) -> None:
    """``--out`` must name a folder we can write, and not one holding another run's results (without --overwrite)."""
    if not a.out or not a.out.strip():
        raise UsageError("--out is empty; pass the folder for the images and report.json")
    out = Path(a.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {short(a.out)} exists and is not a folder; pass a folder for the images and report")
    parent = out
    while not parent.exists():  # the folder is created later: its nearest existing ancestor must be writable
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {short(a.out)} is not writable ({short(str(parent))} does not allow creating "
                         f"files); pick another folder")
    found = existing_results(out)
    if found and not getattr(a, "overwrite", False):
        raise UsageError(f"--out {short(a.out)} already holds results ({found[0].name}, {len(found)} files); pass "
                         f"--overwrite to replace them or pick another folder")


def check_model_args(a, cfg, world: int, info: ModelInfo) -> None:
    """Model-dependent checks that need no weights: prompt, size, tokens and heads vs ranks, CFG."""
    mesh = cfg.resolve(world)
    if info.heads is not None and info.heads % mesh.ulysses:
        raise UsageError(f"the model has {info.heads} attention heads, which a Ulysses degree of {mesh.ulysses} does "
                         f"not divide; use a --ulysses-degree that divides {info.heads} (e.g. --strategy usp)")
    if info.kind in ("digits", "video-digits"):
        from ..bundled.digits import IMAGE_SIZE, PACK, parse_label
        from ..bundled.video_digits import FRAME_SIZE, NUM_FRAMES
        try:
            parse_label(a.prompt)
        except (TypeError, ValueError):
            raise UsageError(f"--prompt: the bundled digits model takes a single digit 0-9, got {short(a.prompt)}") from None
        side, frames = (IMAGE_SIZE, 1) if info.kind == "digits" else (FRAME_SIZE, NUM_FRAMES)
        h, w = a.height or side, a.width or side
        for name, v in (("height", h), ("width", w)):
            if v % PACK:
                raise UsageError(f"--{name} {v} must be a multiple of {PACK} for the {info.kind} model")
        tokens = frames * (h // PACK) * (w // PACK)
        if tokens < mesh.sp:
            raise UsageError(f"a {h}x{w} image has {tokens} tokens, fewer than the {mesh.sp} sequence-parallel "
                             f"ranks; use a larger --height/--width or fewer ranks")
        if a.cfg_parallel and a.guidance_scale is not None and a.guidance_scale <= 1.0:
            raise UsageError(f"--cfg-parallel needs classifier-free guidance, but --guidance-scale {a.guidance_scale:g} "
                             f"turns it off; use a scale > 1 or drop --cfg-parallel")
        return
    if a.cfg_parallel and info.pipeline_class.startswith("Flux"):
        raise UsageError(f"--cfg-parallel needs a pipeline with classifier-free guidance; {info.pipeline_class} has "
                         f"none (guidance is distilled into the model); drop --cfg-parallel")


def smallest_message_bytes(a, cfg, world: int, info: ModelInfo) -> int:
    """A lower bound on one attention message's size (for the sleep-mode check); 1 KiB when unknown."""
    if info.kind != "digits" or world == 1:
        return 1024
    from ..bundled.digits import IMAGE_SIZE, PACK
    mesh = cfg.resolve(world)
    tokens = ((a.height or IMAGE_SIZE) // PACK) * ((a.width or IMAGE_SIZE) // PACK) // max(1, mesh.sp)
    try:
        conf = json.loads((info.path / "transformer" / "config.json").read_text())
        channels = int(conf["num_attention_heads"]) * int(conf["attention_head_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1024
    raw = tokens * channels * 4  # one batch row of K in fp32
    return max(64, raw // (1 if a.codec == "none" else 32))  # binary: 1 bit per value is the strongest codec


def check_link(a, cfg, world: int, info: ModelInfo) -> None:
    """``--link-mode sleep`` really sleeps: a link so slow that one message outlasts ``--timeout`` would end in a
    timeout that blames a peer, so refuse it up front."""
    link = cfg.link
    if link.mode != "sleep" or world == 1:
        return
    nbytes = smallest_message_bytes(a, cfg, world, info)
    cost = link.cost(nbytes)
    if cost >= a.timeout:
        raise UsageError(f"--link-mode sleep with --bandwidth {short(a.bandwidth, 30)} --latency {short(a.latency, 30)} "
                         f"sleeps at least {cost:.3g} s per message (>= {nbytes:,} B), not below --timeout "
                         f"{a.timeout:g} s; raise --bandwidth, raise --timeout, or use --link-mode virtual")
