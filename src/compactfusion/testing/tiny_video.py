"""Tiny random-weight video families: Wan 2.1 / 2.2, LTX-Video, CogVideoX, HunyuanVideo (1.0 and 1.5).

``tiny_<family>_transformer(seed, ...)`` returns ``(transformer, make_kwargs)``;
``make_kwargs(batch=1, grid=(f, h, w), text=7, seed=0)`` builds seeded forward kwargs whose image token count
is ``f*h*w`` AFTER patching (choose e.g. (1, 3, 5) for a count that divides neither 2 nor 4), with
``return_dict=False``. Pipelines use tiny T5/UMT5 encoders with the hand-built tokenizer where the family's
encoder is T5-like; Llama/Qwen-VL encoders are replaced by precomputed embeddings (see tiny_call_kwargs).
"""
from __future__ import annotations

import torch

from ._parts import eval_pipe, randn, t5, t5_tokenizer, umt5


# ---- Wan 2.1 / 2.2 -------------------------------------------------------------------------------------------

def tiny_wan_transformer(seed: int = 0, heads: int = 2, head_dim: int = 12, layers: int = 2, in_channels: int = 16,
                         i2v: bool = False):
    """``i2v=True``: Wan 2.1 I2V layout (CLIP image tokens cross-attended through ``add_k_proj``/``add_v_proj``;
    the processor hard-codes 512 text tokens, so make_kwargs then needs ``text=512``)."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    extra = dict(image_dim=16, added_kv_proj_dim=heads * head_dim) if i2v else {}
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                               in_channels=in_channels, out_channels=in_channels, text_dim=32, freq_dim=256,
                               ffn_dim=32, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                               rope_max_seq_len=32, **extra).eval()

    def make_kwargs(batch=1, grid=(2, 3, 5), text=7, seed=0, per_token_timestep=False, image_tokens=5):
        """``per_token_timestep``: a (B, f*h*w) timestep like Wan 2.2 TI2V (first frame at t=0, the rest 0.5*1000)."""
        if i2v and text != 512:
            raise ValueError("the Wan I2V processor hard-codes 512 text tokens: call make_kwargs(text=512)")
        g = torch.Generator().manual_seed(seed)
        f, h, w = grid
        timestep = torch.full((batch,), 500.0)
        if per_token_timestep:
            timestep = torch.full((batch, f * h * w), 500.0)
            timestep[:, : h * w] = 0.0
        kw = dict(hidden_states=randn(g, batch, in_channels, f, 2 * h, 2 * w), timestep=timestep,
                  encoder_hidden_states=randn(g, batch, text, 32), return_dict=False)
        if i2v:
            kw["encoder_hidden_states_image"] = randn(g, batch, image_tokens, 16)
        return kw
    return tr, make_kwargs


def _wan_vae(z_dim=16, **kw):
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], **kw)


def tiny_wan(seed: int = 0):
    """Wan 2.1 T2V: one transformer, separate cond/uncond transformer calls per step."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    transformer, _ = tiny_wan_transformer(seed)
    torch.manual_seed(seed)
    return eval_pipe(WanPipeline(tokenizer=t5_tokenizer(), text_encoder=umt5(), vae=_wan_vae(), transformer=transformer,
                                 scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0)))


def tiny_wan22(seed: int = 0):
    """Wan 2.2 A14B layout: ``transformer`` (high noise) and ``transformer_2`` (low noise) switched at
    ``boundary_ratio`` (0.875: with 2+ steps the first step uses ``transformer``, later ones ``transformer_2``)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline
    transformer, _ = tiny_wan_transformer(seed)
    transformer_2, _ = tiny_wan_transformer(seed + 1)
    torch.manual_seed(seed)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return eval_pipe(WanPipeline(tokenizer=t5_tokenizer(), text_encoder=umt5(), vae=_wan_vae(), transformer=transformer,
                                 transformer_2=transformer_2, boundary_ratio=0.875, scheduler=sched))


def tiny_wan22_ti2v(seed: int = 0):
    """Wan 2.2 TI2V-5B layout: ``expand_timesteps=True`` -> per-token (B, S) timesteps, 48-channel residual VAE."""
    from diffusers import UniPCMultistepScheduler, WanPipeline
    transformer, _ = tiny_wan_transformer(seed, in_channels=48)
    torch.manual_seed(seed)
    vae = _wan_vae(z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                   latents_mean=[0.0] * 48, latents_std=[1.0] * 48, scale_factor_spatial=16, scale_factor_temporal=4)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return eval_pipe(WanPipeline(tokenizer=t5_tokenizer(), text_encoder=umt5(), vae=vae, transformer=transformer,
                                 scheduler=sched, expand_timesteps=True))


# ---- LTX-Video -----------------------------------------------------------------------------------------------

def tiny_ltx_transformer(seed: int = 0, heads: int = 4, head_dim: int = 8, layers: int = 1):
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(seed)
    tr = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                    num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=32,
                                    num_layers=layers, caption_channels=32).eval()

    def make_kwargs(batch=1, grid=(2, 3, 5), text=7, seed=0, text_pad=0):
        """``text_pad`` > 0 zeroes that many trailing entries of the last sample's text mask (the pipeline
        always passes a T5 padding mask)."""
        g = torch.Generator().manual_seed(seed)
        f, h, w = grid
        mask = torch.ones(batch, text, dtype=torch.long)
        if text_pad:
            mask[-1, text - text_pad:] = 0
        return dict(hidden_states=randn(g, batch, f * h * w, 8), encoder_hidden_states=randn(g, batch, text, 32),
                    timestep=torch.full((batch,), 500.0), encoder_attention_mask=mask, num_frames=f, height=h,
                    width=w, rope_interpolation_scale=(1.0, 1.0, 1.0), return_dict=False)
    return tr, make_kwargs


def tiny_ltx(seed: int = 0):
    """LTXPipeline: CFG is ONE transformer call per step on a 2B batch, with a T5 padding mask."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    transformer, _ = tiny_ltx_transformer(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False, False, False, False, False),
                                upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                                timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                                decoder_causal=False)
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return eval_pipe(LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5(),
                                 tokenizer=t5_tokenizer(), transformer=transformer))


# ---- CogVideoX -----------------------------------------------------------------------------------------------

def tiny_cogvideox_transformer(seed: int = 0, heads: int = 2, head_dim: int = 16, layers: int = 1, text: int = 16,
                               rotary: bool = True):
    """``rotary=True``: CogVideoX-5B style (RoPE tables passed in as ``image_rotary_emb``, plus sincos positions
    off); ``False``: CogVideoX-2B style (3-D sincos positions added in ``patch_embed``). The text length is fixed
    by the config (``max_text_seq_length``; the pipeline pads prompts to it). ``head_dim`` must divide by 16
    (the 3-D RoPE splits it 1/4, 3/8, 3/8 into even parts)."""
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(seed)
    tr = CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                     out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=layers,
                                     sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                     temporal_compression_ratio=4, max_text_seq_length=text,
                                     use_rotary_positional_embeddings=rotary,
                                     use_learned_positional_embeddings=False).eval()

    def make_kwargs(batch=1, grid=(2, 3, 5), text=text, seed=0):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        if text != tr.config.max_text_seq_length:
            raise ValueError(f"this tiny CogVideoX takes exactly {tr.config.max_text_seq_length} text tokens "
                             f"(max_text_seq_length); build it with text={text}")
        g = torch.Generator().manual_seed(seed)
        f, h, w = grid
        rope = None
        if rotary:
            rope = get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=((0, 0), (h, w)), grid_size=(h, w),
                                           temporal_size=f, device=torch.device("cpu"))
        return dict(hidden_states=randn(g, batch, f, 4, 2 * h, 2 * w), encoder_hidden_states=randn(g, batch, text, 32),
                    timestep=torch.full((batch,), 500, dtype=torch.long), image_rotary_emb=rope, return_dict=False)
    return tr, make_kwargs


def tiny_cogvideox(seed: int = 0, rotary: bool = True):
    """CogVideoXPipeline: CFG batched (one call per step on 2B); ``image_rotary_emb`` computed by the pipeline."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, DDIMScheduler
    transformer, _ = tiny_cogvideox_transformer(seed, rotary=rotary)
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    return eval_pipe(CogVideoXPipeline(tokenizer=t5_tokenizer(), text_encoder=t5(), vae=vae, transformer=transformer,
                                       scheduler=DDIMScheduler()))


# ---- HunyuanVideo (1.0) --------------------------------------------------------------------------------------

def tiny_hunyuanvideo_transformer(seed: int = 0, heads: int = 2, head_dim: int = 10, layers: int = 1,
                                  single_layers: int = 1):
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(seed)
    tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                        attention_head_dim=head_dim, num_layers=layers, num_single_layers=single_layers,
                                        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                                        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()

    def make_kwargs(batch=1, grid=(2, 3, 5), text=7, seed=0, text_pad=2):
        """The pipeline always pads text to max_sequence_length, so by default the last ``text_pad`` text tokens
        of the last sample are padding (mask 0) — the self-attention mask is then not all-ones."""
        g = torch.Generator().manual_seed(seed)
        f, h, w = grid
        mask = torch.ones(batch, text, dtype=torch.long)
        if text_pad:
            mask[-1, text - text_pad:] = 0
        return dict(hidden_states=randn(g, batch, 4, f, h, w), timestep=torch.full((batch,), 500.0),
                    encoder_hidden_states=randn(g, batch, text, 16), encoder_attention_mask=mask,
                    pooled_projections=randn(g, batch, 8), guidance=torch.full((batch,), 6000.0), return_dict=False)
    return tr, make_kwargs


def _hunyuan_vae():
    from diffusers import AutoencoderKLHunyuanVideo
    return AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                     down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                     up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                     layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                     spatial_compression_ratio=8, temporal_compression_ratio=4,
                                     mid_block_add_attention=True)


def tiny_hunyuanvideo(seed: int = 0):
    """HunyuanVideoPipeline without its Llama/CLIP encoders: driven by ``prompt_embeds``,
    ``pooled_prompt_embeds`` and ``prompt_attention_mask`` (tiny_call_kwargs)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    transformer, _ = tiny_hunyuanvideo_transformer(seed)
    torch.manual_seed(seed)
    return eval_pipe(HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=_hunyuan_vae(),
                                          scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                          tokenizer_2=None))


# ---- HunyuanVideo 1.5 ----------------------------------------------------------------------------------------

def tiny_hunyuanvideo15_transformer(seed: int = 0, heads: int = 2, head_dim: int = 8, layers: int = 1):
    from diffusers import HunyuanVideo15Transformer3DModel
    torch.manual_seed(seed)
    tr = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=heads,
                                          attention_head_dim=head_dim, num_layers=layers, num_refiner_layers=1,
                                          mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                                          text_embed_2_dim=32, image_embed_dim=12, rope_axes_dim=(2, 2, 4),
                                          target_size=16, task_type="t2v").eval()

    def make_kwargs(batch=1, grid=(2, 3, 5), text=7, seed=0, text_pad=2, text_2=5, image_tokens=3):
        """T2V inputs: Qwen-VL text (``text`` tokens, last ``text_pad`` padded), ByT5 glyph text (``text_2``
        tokens, last one padded) and all-zero image embeds (the model then masks all ``image_tokens``; the
        pipeline uses 729)."""
        g = torch.Generator().manual_seed(seed)
        f, h, w = grid
        mask = torch.ones(batch, text, dtype=torch.long)
        mask[:, text - text_pad:] = 0
        mask_2 = torch.ones(batch, text_2, dtype=torch.long)
        mask_2[:, -1] = 0
        return dict(hidden_states=randn(g, batch, 9, f, h, w), timestep=torch.full((batch,), 500.0),
                    encoder_hidden_states=randn(g, batch, text, 16), encoder_attention_mask=mask,
                    encoder_hidden_states_2=randn(g, batch, text_2, 32), encoder_attention_mask_2=mask_2,
                    image_embeds=torch.zeros(batch, image_tokens, 12), return_dict=False)
    return tr, make_kwargs


def tiny_hunyuanvideo15(seed: int = 0):
    """HunyuanVideo15Pipeline without its Qwen-VL / ByT5 encoders (prompt embeds for both, tiny_call_kwargs);
    its ClassifierFreeGuidance guider runs separate cond/uncond transformer calls per step."""
    from diffusers import AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
    from diffusers import HunyuanVideo15Pipeline
    transformer, _ = tiny_hunyuanvideo15_transformer(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False)
    return eval_pipe(HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                            tokenizer_2=None, guider=ClassifierFreeGuidance(guidance_scale=2.0)))
