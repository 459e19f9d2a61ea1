"""Route a diffusers attention module's ``scaled_dot_product_attention`` call to the parallel context.

Every diffusers family we support (Flux's ``dispatch_attention_fn`` with the native backend, SD3's
``JointAttnProcessor2_0``, PixArt's ``AttnProcessor2_0`` and most others) ends in
``F.scaled_dot_product_attention(q, k, v)`` with (B, H, S, D) tensors. A ``TorchFunctionMode`` that is
active only while one attention module runs catches that call, so no processor is forked and nothing
global is patched. The adapter tells where the replicated joint (text) tokens sit: in ``front`` (Flux)
or at the ``rear`` (SD3) of the sequence; everything else in the call is this rank's image shard.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class UnsupportedAttentionError(ValueError):
    """An attention call whose token layout the adapter cannot map onto the sequence shards."""


class AttentionRouter(TorchFunctionMode):
    def __init__(self, runtime, layer: int):
        super().__init__()
        self.runtime = runtime
        self.layer = layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        rt = self.runtime
        s_local, n_joint, position = rt.local_tokens, rt.joint_tokens, rt.adapter.joint_position
        sq, sk = query.shape[-2], key.shape[-2]
        if sk != sq or rt.local_tokens is None:
            # cross-attention to replicated context (PixArt's text) needs no communication
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if sq == s_local:
            joint = 0
        elif position != "none" and sq == s_local + n_joint:
            joint = n_joint
        else:
            raise UnsupportedAttentionError(
                f"attention layer {self.layer}: {sq} query tokens match neither this rank's {s_local} image tokens "
                f"nor image + {n_joint} joint tokens; the {rt.adapter.name} adapter cannot shard this model")
        if attn_mask is not None or is_causal or dropout_p or enable_gqa or query.shape[1] != key.shape[1]:
            raise UnsupportedAttentionError(
                f"attention layer {self.layer}: masks, causal attention, dropout and grouped-query attention are not "
                f"supported by sequence-parallel strategies; call .eval() and use an unmasked model")
        head_dim = query.shape[-1]
        if scale is not None:  # the context uses the default 1/sqrt(D); fold any other scale into q
            query = query * (scale * math.sqrt(head_dim))
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D)
        step = rt.step
        if joint == 0:
            out = rt.ctx.attention(q, k, v, layer=self.layer, step=step)
        else:
            jsl = slice(0, joint) if position == "front" else slice(sq - joint, sq)
            isl = slice(joint, sq) if position == "front" else slice(0, sq - joint)
            out_img, out_joint = rt.ctx.attention(q[:, isl], k[:, isl], v[:, isl], layer=self.layer, step=step,
                                                  joint_q=q[:, jsl], joint_k=k[:, jsl], joint_v=v[:, jsl])
            parts = (out_joint, out_img) if position == "front" else (out_img, out_joint)
            out = torch.cat(parts, dim=1)
        return out.transpose(1, 2)
