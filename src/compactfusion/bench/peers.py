"""Peer baseline: diffusers' native context parallelism (ring / Ulysses) on the bundled digits model.

Runs inside benchmark worker processes only. Two CPU workarounds (platform notes 5.2) are applied by
:func:`apply_cpu_workarounds` in the worker, never on compactfusion's import path:

1. ``torch.accelerator.device_count`` returns 1 (diffusers computes ``rank % device_count()``, 0 on CPU);
2. an LSE-returning CPU attention forward op for the ring (diffusers' native op refuses ``return_lse``).

Bytes are counted by wrapping diffusers' three communication points (platform notes 5.5/5.6):
A ``attention_dispatch._all_to_all_single`` (Ulysses q/k/v/o), B ``attention_dispatch.funcol``'s
``all_gather_tensor`` (the ring's K|V all-gather) and C ``hooks.context_parallel.funcol``'s
``all_gather_tensor`` (the output gather). Each wrapped op is charged with compactfusion's alpha-beta
model: an all-gather of ``b`` bytes costs ``(W-1) * (latency + b / bandwidth)``, an all-to-all the sum over
peers of ``latency + chunk / bandwidth``; in "sleep" mode the op's real time is padded up to that.

``PEER_TRAFFIC``: the peer's per-step traffic for ``bench project``, from the library's own formulas (diffusers'
native CP never compresses): its ring all-gathers K|V as strategy="patch" does, its Ulysses moves q, k, v and
o as four all-to-alls.
"""
from __future__ import annotations

import time
from types import MappingProxyType

import torch
import torch.distributed as dist

from ..parallel import patch, ulysses

__all__ = ["apply_cpu_workarounds", "CommMeter", "install_meter", "enable_native_cp", "PEER_MODES", "PEER_TRAFFIC"]

PEER_MODES = ("ring", "ulysses")


def _diffusers_ulysses_traffic(shape, wire):
    return ulysses.step_traffic(shape, wire, messages=4 * (shape.world - 1))


#: ``bench project`` strategy name -> the peer's traffic formula (``parallel/traffic.py``'s signature).
PEER_TRAFFIC = MappingProxyType({"diffusers-ring": patch.step_traffic, "diffusers-ulysses": _diffusers_ulysses_traffic})
_APPLIED = False


def apply_cpu_workarounds() -> None:
    """Patch torch/diffusers process-globally so native CP runs on CPU + gloo (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    import diffusers.models.attention_dispatch as ad

    if not torch.cuda.is_available():
        torch.accelerator.device_count = lambda: 1
    orig = ad._native_attention_forward_op

    def cpu_lse_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse or query.device.type != "cpu":
            return orig(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                        _save_ctx, _parallel_config)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # (B,S,H,D) -> (B,H,S,D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[:2]
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # (B,S,H,D), (B,S,H)

    ad._native_attention_forward_op = cpu_lse_forward_op
    _APPLIED = True


class CommMeter:
    """Bytes this rank sends through diffusers' CP ops, with the link model applied per op."""

    def __init__(self, link=None):
        self.link = link
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = 0
        self.messages = 0
        self.modeled_s = 0.0
        self.by_point: dict[str, int] = {}

    def charge(self, point: str, messages: list[int], t0: float) -> None:
        msgs = [int(b) for b in messages if b > 0]
        self.bytes_sent += sum(msgs)
        self.messages += len(msgs)
        self.by_point[point] = self.by_point.get(point, 0) + sum(msgs)
        link = self.link
        if link is None or not link.enabled:
            return
        cost = link.op_cost(msgs)
        self.modeled_s += cost
        if link.mode == "sleep":
            rest = cost - (time.monotonic() - t0)
            if rest > 0:
                time.sleep(rest)

    def summary(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_uncompressed": self.bytes_sent, "messages": self.messages,
                "modeled_comm_s": self.modeled_s, "bytes_sent_after_warmup": self.bytes_sent,
                "bytes_uncompressed_after_warmup": self.bytes_sent, "bytes_sent_warmup": 0,
                "by_point": dict(self.by_point)}


def _group_size(group) -> int:
    try:
        return dist.get_world_size(group)
    except Exception:  # noqa: BLE001 - a mesh or a group name: fall back to the world
        return dist.get_world_size()


def _wait(x):
    return x.wait() if hasattr(x, "wait") and callable(x.wait) else x


class _FuncolProxy:
    """Delegates to torch's functional collectives; ``all_gather_tensor`` is metered (and waited)."""

    def __init__(self, inner, point: str, meter: CommMeter):
        self._inner, self._point, self._meter = inner, point, meter

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def all_gather_tensor(self, tensor, gather_dim, group, *args, **kwargs):
        t0 = time.monotonic()
        out = _wait(self._inner.all_gather_tensor(tensor, gather_dim, group, *args, **kwargs))
        w = _group_size(group)
        nbytes = tensor.numel() * tensor.element_size()
        self._meter.charge(self._point, [nbytes] * (w - 1), t0)
        return out


def install_meter() -> CommMeter:
    """Wrap hook points A, B and C (process-global; benchmark workers only); returns the process's meter."""
    import diffusers.hooks.context_parallel as hcp
    import diffusers.models.attention_dispatch as ad

    meter = getattr(ad, "_cf_meter", None)
    if meter is not None:
        return meter
    meter = CommMeter()
    orig_a2a = ad._all_to_all_single

    def metered_all_to_all_single(x, group):
        t0 = time.monotonic()
        out = orig_a2a(x, group)
        w = _group_size(group)
        chunk = x.numel() * x.element_size() // w
        meter.charge("all_to_all", [chunk] * (w - 1), t0)
        return out

    ad._all_to_all_single = metered_all_to_all_single
    ad.funcol = _FuncolProxy(ad.funcol, "ring_kv", meter)
    hcp.funcol = _FuncolProxy(hcp.funcol, "out_gather", meter)
    ad._cf_meter = meter
    return meter


def enable_native_cp(pipe, mode: str, world: int) -> None:
    """``transformer.enable_parallelism`` with a ring or Ulysses ContextParallelConfig over the world."""
    from diffusers import ContextParallelConfig

    if mode not in PEER_MODES:
        raise ValueError(f"unknown diffusers CP mode {mode!r}; use one of {PEER_MODES}")
    cfg = ContextParallelConfig(ring_degree=world) if mode == "ring" else ContextParallelConfig(ulysses_degree=world)
    pipe.transformer.enable_parallelism(config=cfg)


def check_divisible(text_tokens: int, image_tokens: int, heads: int, world: int, mode: str) -> str | None:
    """diffusers' Flux plan splits image and text tokens evenly (and heads for Ulysses): why not, or None."""
    if image_tokens % world or text_tokens % world:
        return f"diffusers CP needs {image_tokens} image and {text_tokens} text tokens divisible by {world}"
    if mode == "ulysses" and heads % world:
        return f"diffusers Ulysses needs {heads} heads divisible by {world}"
    return None


def peer_runs(rank: int, world: int, plan: dict, run_one) -> list[dict]:
    """For each diffusers CP mode: fresh pipeline, enable CP, then ``run_one(pipe, mode, meter)`` -> results.

    Called at the end of a benchmark worker (after compactfusion's own methods), because the workarounds
    are process-global.
    """
    import logging

    from ..bundled.digits import load_digits_pipeline

    apply_cpu_workarounds()
    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
    meter = install_meter()
    out = []
    for mode in plan.get("peer_modes", PEER_MODES):
        pipe = load_digits_pipeline(plan.get("model"))
        pipe.set_progress_bar_config(disable=True)
        cfg = pipe.transformer.config
        text = pipe.label_embedder.config.text_tokens
        why = check_divisible(text, 256, cfg.num_attention_heads, world, mode)
        if why:
            out.append({"mode": mode, "skipped": why})
            continue
        enable_native_cp(pipe, mode, world)
        out.append({"mode": mode, **run_one(pipe, mode, meter)})
        del pipe
    return out
