"""Route the attention calls of a diffusers self-attention module to the parallel context.

diffusers' processors call ``dispatch_attention_fn``, whose backend registry picks the kernel
(``attention_dispatch.py``); the native backends (``native``, ``_native_math``, ``_native_flash``,
``_native_efficient``, ``_native_cudnn``) and processors that skip the dispatcher (SD3's
``JointAttnProcessor2_0``, PixArt's ``AttnProcessor2_0``) all end in
``F.scaled_dot_product_attention`` on (B, H, S, D) tensors. A ``TorchFunctionMode`` active only while
one attention module runs catches that call, so no processor is forked and nothing global is patched.

Backends that do not go through SDPA (flex, flash-attn, sage, xformers, NPU/XLA kernels) would attend
locally, i.e. silently wrong; they are refused by name (``check_backend``) before the module runs, and
the runtime also counts the calls each self-attention module routed and raises if one routed none.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionRouter", "UnsupportedAttentionError", "UnroutedAttentionError", "ROUTABLE_BACKENDS",
           "check_backend", "backend_of"]

#: dispatcher backends whose kernel is F.scaled_dot_product_attention (``None``: the processor's default).
ROUTABLE_BACKENDS = frozenset({None, "native", "_native_math", "_native_flash", "_native_efficient",
                               "_native_cudnn"})


class UnsupportedAttentionError(ValueError):
    """An attention call that the sequence-parallel strategies cannot run exactly."""


class UnroutedAttentionError(RuntimeError):
    """A self-attention module attended without reaching the parallel context (it would be silently wrong)."""


def backend_of(module) -> str | None:
    """The attention backend a diffusers attention module will dispatch to (None = processor default)."""
    backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
    if backend is None:
        try:  # the global default: DIFFUSERS_ATTN_BACKEND or the `attention_backend(...)` context manager
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry
            name, _ = _AttentionBackendRegistry.get_active_backend()
            backend = None if str(getattr(name, "value", name)) == "native" else name
        except Exception:  # noqa: BLE001 - older diffusers without a registry: the processor uses SDPA
            backend = None
    return None if backend is None else str(getattr(backend, "value", backend))


def check_backend(module, name: str) -> None:
    """Refuse an attention backend whose kernel the router cannot see."""
    backend = backend_of(module)
    if backend not in ROUTABLE_BACKENDS:
        raise UnsupportedAttentionError(
            f"attention module {name!r} uses the {backend!r} attention backend, which compactfusion cannot route "
            f"(its kernel bypasses scaled_dot_product_attention, so each rank would attend only to its own tokens); "
            f"call transformer.set_attention_backend('native') (or '_native_flash' / '_native_math') before "
            f"generating")


class AttentionRouter(TorchFunctionMode):
    """Active while one self-attention module runs: its SDPA calls become parallel attention."""

    def __init__(self, runtime, layer: int, name: str):
        super().__init__()
        self.runtime, self.layer, self.name = runtime, layer, name
        self.routed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        where = f"attention module {self.name!r} (layer {self.layer})"
        if key.shape[-2] != query.shape[-2]:
            raise UnsupportedAttentionError(
                f"{where}: {query.shape[-2]} query tokens attend to {key.shape[-2]} keys inside a self-attention "
                f"module (extra key tokens such as an IP-Adapter's are not sharded); declare the module as "
                f"cross-attention in the plan or remove the adapter")
        n_joint, position = self.runtime.joint_layout(query.shape[-2], where)
        keep_q = None
        if attn_mask is not None:
            attn_mask, keep_q = _joint_keys(attn_mask, query.shape[-2], n_joint, position, where)
        if is_causal or enable_gqa or query.shape[1] != key.shape[1]:
            raise UnsupportedAttentionError(f"{where}: causal and grouped-query attention are not supported by the "
                                            f"sequence-parallel strategies")
        if dropout_p:
            raise UnsupportedAttentionError(f"{where}: attention dropout {dropout_p} is on; call .eval() on the "
                                            f"transformer before generating")
        head_dim = query.shape[-1]
        if scale is not None:  # the context uses the default 1/sqrt(D); fold any other scale into q
            query = query * (scale * math.sqrt(head_dim))
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D)
        self.routed += 1
        if not n_joint:
            return self.runtime.route(q, k, v, self.layer).transpose(1, 2)
        sq = q.shape[1]
        jsl = slice(0, n_joint) if position == "front" else slice(sq - n_joint, sq)
        isl = slice(n_joint, sq) if position == "front" else slice(0, sq - n_joint)
        jk, jv = k[:, jsl], v[:, jsl]
        if attn_mask is not None:  # masked (padding) text keys are replicated: leaving them out is exact
            jk, jv = jk[:, attn_mask], jv[:, attn_mask]
        out_img, out_joint = self.runtime.route(q[:, isl], k[:, isl], v[:, isl], self.layer, joint=(q[:, jsl], jk, jv))
        if keep_q is not None:  # fully masked query rows: SDPA's result for them is zero
            out_joint = out_joint * keep_q[None, :, None, None].to(out_joint.dtype)
        parts = (out_joint, out_img) if position == "front" else (out_img, out_joint)
        return torch.cat(parts, dim=1).transpose(1, 2)


def _is_keep_all(mask: torch.Tensor) -> bool:
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def _joint_keys(mask: torch.Tensor, sq: int, n_joint: int, position: str, where: str):
    """``(kept joint keys, kept joint queries)`` for a padding mask on the replicated joint tokens only.

    ``(None, None)`` for a mask that masks nothing. Sharded keys travel between ranks, so a mask on them is
    refused; a padding mask on the replicated joint tokens (HunyuanVideo's text) is applied by dropping
    those keys, identically on every rank. A square mask ``(B, 1, S, S)`` that also masks the padded
    tokens as queries (HunyuanVideo 1.5) must be the outer product of one validity vector; those query
    rows then come out zero, as SDPA gives them.
    """
    if _is_keep_all(mask):
        return None, None
    refuse = UnsupportedAttentionError(
        f"{where}: an attention mask that masks sharded tokens (e.g. padded text in a batch of prompts of different "
        f"lengths) is not supported by the sequence-parallel strategies; pass one prompt per call, or prompts "
        f"without padding")
    if not n_joint or mask.shape[-1] != sq or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] not in (1, sq):
        raise refuse
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask <= -1e4)).all()):
        raise refuse
    valid = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # (B, 1 or S, S)
    keep = valid.any(dim=1)
    keep_q = None
    if valid.shape[1] == sq:
        keep_q = valid.any(dim=2)
        if not bool((valid == (keep_q[:, :, None] & keep[:, None, :])).all()):
            raise refuse  # not a padding mask
        jsl_ = slice(0, n_joint) if position == "front" else slice(sq - n_joint, sq)
        isl_ = slice(n_joint, sq) if position == "front" else slice(0, sq - n_joint)
        if not bool(keep_q[:, isl_].all()) or not bool((keep_q[:, jsl_] == keep_q[:1, jsl_]).all()):
            raise refuse
        keep_q = keep_q[0, jsl_]
    jsl = slice(0, n_joint) if position == "front" else slice(sq - n_joint, sq)
    isl = slice(n_joint, sq) if position == "front" else slice(0, sq - n_joint)
    if not bool(keep[:, isl].all()) or not bool((keep[:, jsl] == keep[:1, jsl]).all()):
        raise refuse  # masked sharded keys, or a different padding per batch entry
    return keep[0, jsl], keep_q
