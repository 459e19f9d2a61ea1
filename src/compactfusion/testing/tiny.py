"""Tiny random-weight diffusers pipelines and bare transformers, built fully offline (hand-built tokenizers).

For tests and for trying the integration without downloading weights. Seeded, fp32, CPU; every component is
put in eval mode (fresh transformers modules train with dropout, which would make runs non-deterministic).

- ``TINY[family](seed)`` -> eval-mode pipeline, progress bar off; call it with ``tiny_call_kwargs(family, ...)``.
- ``TINY_TRANSFORMERS[family](seed)`` -> ``(transformer, make_kwargs)``; ``make_kwargs(batch=1, grid=..., text=7,
  seed=0)`` gives seeded forward kwargs (``return_dict=False``) with ``prod(grid)`` image tokens after patching,
  so tests can pick counts that divide neither 2 nor 4. Image grids are ``(h, w)``, video grids ``(f, h, w)``.
Families whose real text encoder is a multi-GB VLM/LLM (flux2, qwenimage, hunyuanvideo, hunyuanvideo15) are
built without it and driven by seeded prompt embeddings (``tiny_call_kwargs`` supplies them).
"""
from __future__ import annotations

import torch

from ._parts import clip, clip_tokenizer, eval_pipe, grid_ids, randn, t5, t5_tokenizer
from .tiny_image import tiny_flux2, tiny_flux2_transformer, tiny_qwenimage, tiny_qwenimage_transformer
from .tiny_video import (tiny_cogvideox, tiny_cogvideox_transformer, tiny_hunyuanvideo, tiny_hunyuanvideo15,
                         tiny_hunyuanvideo15_transformer, tiny_hunyuanvideo_transformer, tiny_ltx, tiny_ltx_transformer,
                         tiny_wan, tiny_wan22, tiny_wan22_ti2v, tiny_wan_transformer)

# old private names, kept for callers that reached for them
_clip_tokenizer, _t5_tokenizer, _clip, _t5, _eval = clip_tokenizer, t5_tokenizer, clip, t5, eval_pipe


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


# ---- FLUX.1 ----

def tiny_flux_transformer(seed: int = 0, heads: int = 4, head_dim: int = 16):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
                                pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()

    def make_kwargs(batch=1, grid=(3, 5), text=7, seed=0, controlnet=False):
        """``controlnet=True`` adds full-length ControlNet residuals (one per double / single block), as
        FluxControlNetPipeline passes them: they must be split with the image tokens."""
        g = torch.Generator().manual_seed(seed)
        h, w = grid
        kw = dict(hidden_states=randn(g, batch, h * w, 4), encoder_hidden_states=randn(g, batch, text, 32),
                  pooled_projections=randn(g, batch, 32), timestep=torch.full((batch,), 0.5),
                  img_ids=grid_ids(h, w, prefix=(0,)), txt_ids=torch.zeros(text, 3), return_dict=False)
        if controlnet:
            kw.update(controlnet_block_samples=[randn(g, batch, h * w, heads * head_dim)],
                      controlnet_single_block_samples=[randn(g, batch, h * w, heads * head_dim)])
        return kw
    return tr, make_kwargs


def tiny_flux(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    transformer, _ = tiny_flux_transformer(seed)
    return eval_pipe(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=clip(),
                                  tokenizer=clip_tokenizer(), text_encoder_2=t5(), tokenizer_2=t5_tokenizer(),
                                  transformer=transformer))


def tiny_flux_controlnet(seed: int = 0):
    """FluxControlNetPipeline: the tiny FLUX.1 plus a same-sized 1+1-block FluxControlNetModel whose residuals
    (full token length) are added inside every transformer block; call with ``control_image`` (tiny_call_kwargs)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline
    transformer, _ = tiny_flux_transformer(seed)
    torch.manual_seed(seed + 1)
    controlnet = FluxControlNetModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    return eval_pipe(FluxControlNetPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1),
                                            text_encoder=clip(), tokenizer=clip_tokenizer(), text_encoder_2=t5(),
                                            tokenizer_2=t5_tokenizer(), transformer=transformer,
                                            controlnet=controlnet))


# ---- SD3 ----

def tiny_sd3_transformer(seed: int = 0, heads: int = 4, head_dim: int = 8):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    tr = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=head_dim,
                               num_attention_heads=heads, caption_projection_dim=32, joint_attention_dim=32,
                               pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96).eval()

    def make_kwargs(batch=1, grid=(3, 5), text=7, seed=0):
        g = torch.Generator().manual_seed(seed)
        h, w = grid
        return dict(hidden_states=randn(g, batch, 4, h, w), encoder_hidden_states=randn(g, batch, text, 32),
                    pooled_projections=randn(g, batch, 64), timestep=torch.full((batch,), 500.0), return_dict=False)
    return tr, make_kwargs


def tiny_sd3(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    transformer, _ = tiny_sd3_transformer(seed)
    return eval_pipe(StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=clip(True), tokenizer=clip_tokenizer(),
        text_encoder_2=clip(True), tokenizer_2=clip_tokenizer(), text_encoder_3=t5(), tokenizer_3=t5_tokenizer(),
        transformer=transformer))


# ---- PixArt ----

def tiny_pixart_transformer(seed: int = 0, heads: int = 4, head_dim: int = 8):
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    tr = PixArtTransformer2DModel(sample_size=32, num_layers=2, patch_size=1, attention_head_dim=head_dim,
                                  num_attention_heads=heads, caption_channels=32, in_channels=4,
                                  cross_attention_dim=heads * head_dim, out_channels=8).eval()

    def make_kwargs(batch=1, grid=(3, 5), text=7, seed=0, text_pad=0):
        g = torch.Generator().manual_seed(seed)
        h, w = grid
        mask = torch.ones(batch, text, dtype=torch.long)
        if text_pad:
            mask[-1, text - text_pad:] = 0
        return dict(hidden_states=randn(g, batch, 4, h, w), encoder_hidden_states=randn(g, batch, text, 32),
                    encoder_attention_mask=mask, timestep=torch.full((batch,), 500.0),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    return tr, make_kwargs


def tiny_pixart(seed: int = 0):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline
    transformer, _ = tiny_pixart_transformer(seed)
    return eval_pipe(PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5(), vae=_vae(4),
                                         transformer=transformer, scheduler=DDIMScheduler()))


TINY = {"flux": tiny_flux, "flux_controlnet": tiny_flux_controlnet, "sd3": tiny_sd3, "pixart": tiny_pixart, "flux2": tiny_flux2, "qwenimage": tiny_qwenimage,
        "wan": tiny_wan, "wan22": tiny_wan22, "wan22_ti2v": tiny_wan22_ti2v, "ltx": tiny_ltx,
        "cogvideox": tiny_cogvideox, "hunyuanvideo": tiny_hunyuanvideo, "hunyuanvideo15": tiny_hunyuanvideo15}

TINY_TRANSFORMERS = {"flux": tiny_flux_transformer, "sd3": tiny_sd3_transformer, "pixart": tiny_pixart_transformer,
                     "flux2": tiny_flux2_transformer, "qwenimage": tiny_qwenimage_transformer,
                     "wan": tiny_wan_transformer, "ltx": tiny_ltx_transformer, "cogvideox": tiny_cogvideox_transformer,
                     "hunyuanvideo": tiny_hunyuanvideo_transformer,
                     "hunyuanvideo15": tiny_hunyuanvideo15_transformer}

VIDEO_FAMILIES = frozenset({"wan", "wan22", "wan22_ti2v", "ltx", "cogvideox", "hunyuanvideo", "hunyuanvideo15"})


def _embeds(seed: int, negative: bool, **shapes) -> dict:
    """Seeded prompt embeddings (and their negatives) for pipelines built without a text encoder.
    ``shapes``: kwarg name -> shape; names ending in ``mask`` become 0/1 masks (last two tokens padded)."""
    g = torch.Generator().manual_seed(seed + 1000)
    out = {}
    for prefix in ("", "negative_") if negative else ("",):
        for name, shape in shapes.items():
            if name.endswith("mask") or "mask_" in name:
                m = torch.ones(*shape, dtype=torch.long)
                m[:, -2:] = 0
                out[prefix + name] = m
            else:
                out[prefix + name] = randn(g, *shape)
    return out


def tiny_call_kwargs(family: str, height: int = 32, width: int = 32, steps: int = 3, seed: int = 0,
                     **overrides) -> dict:
    """Seeded call kwargs for ``TINY[family]()``; ``overrides`` replace or add entries (e.g. ``num_frames``,
    ``true_cfg_scale=1.0`` to drop the second, unconditional, call per step). Video pipelines return
    ``.frames``, image pipelines ``.images`` (``output_type="np"``)."""
    if family not in TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(TINY)}")
    kw = dict(prompt="a photo of a red cat", height=height, width=width, num_inference_steps=steps,
              generator=torch.Generator().manual_seed(seed), output_type="np")
    if family == "flux":   # add true_cfg_scale=2.0, negative_prompt=... for two calls per step
        kw.update(max_sequence_length=16, guidance_scale=3.5)
    elif family == "flux_controlnet":
        g = torch.Generator().manual_seed(seed + 2000)
        kw.update(max_sequence_length=16, guidance_scale=3.5, controlnet_conditioning_scale=0.7,
                  control_image=torch.rand(1, 3, height, width, generator=g))
    elif family == "sd3":   # skip_guidance_layers=[1], skip_layer_guidance_start=0.0: + a batch-1 branch from step 1
        kw.update(max_sequence_length=16, guidance_scale=5.0)
    elif family == "pixart":
        kw.update(use_resolution_binning=False, max_sequence_length=16, guidance_scale=4.5)
    elif family == "flux2":   # guidance-distilled: one call per step
        del kw["prompt"]
        kw.update(guidance_scale=4.0, **_embeds(seed, False, prompt_embeds=(1, 7, 16)))
    elif family == "qwenimage":   # true CFG: cond + uncond calls per step; masks all-ones -> the pipeline drops them
        del kw["prompt"]
        kw.update(true_cfg_scale=2.0, **_embeds(seed, True, prompt_embeds=(1, 7, 16)))
        kw.update(prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
                  negative_prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long))
    elif family in ("wan", "wan22", "wan22_ti2v"):   # CFG: separate cond + uncond calls per step
        kw.update(negative_prompt="a dog", num_frames=5, max_sequence_length=16, guidance_scale=5.0)
    elif family == "ltx":   # CFG batched in one call; T5 padding mask always present
        kw.update(negative_prompt="", num_frames=9, max_sequence_length=16, guidance_scale=3.0)
    elif family == "cogvideox":   # CFG batched; text length must equal the tiny config's max_text_seq_length (16)
        kw.update(negative_prompt="", num_frames=9, max_sequence_length=16, guidance_scale=6.0)
    elif family == "hunyuanvideo":   # true CFG (2 calls per step) plus embedded guidance; padded text masks
        del kw["prompt"]
        kw.update(num_frames=9, guidance_scale=6.0, true_cfg_scale=2.0,
                  **_embeds(seed, True, prompt_embeds=(1, 7, 16), pooled_prompt_embeds=(1, 8),
                            prompt_attention_mask=(1, 7)))
    elif family == "hunyuanvideo15":   # guider CFG (2 calls per step); padded masks for both text streams
        del kw["prompt"]
        kw.update(num_frames=9, **_embeds(seed, True, prompt_embeds=(1, 7, 16), prompt_embeds_mask=(1, 7),
                                          prompt_embeds_2=(1, 4, 32), prompt_embeds_mask_2=(1, 4)))
    kw.update(overrides)
    return kw
