"""Tiny random-weight image families beyond FLUX.1/SD3/PixArt: FLUX.2 and Qwen-Image.

Each ``tiny_<family>_transformer(seed, ...)`` returns ``(transformer, make_kwargs)`` where
``make_kwargs(batch=1, grid=(h, w), text=7, seed=0)`` builds seeded forward kwargs with ``h*w`` image tokens
(after patching) and ``text`` text tokens, ``return_dict=False``. Pipelines take precomputed prompt
embeddings (their real text encoders are multi-GB VLMs; see ``tiny_call_kwargs``).
"""
from __future__ import annotations

import torch

from ._parts import eval_pipe, grid_ids, randn


def tiny_flux2_transformer(seed: int = 0, heads: int = 2, head_dim: int = 16, layers: int = 1, single_layers: int = 1):
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(seed)
    tr = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single_layers,
                                 attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=16,
                                 timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4)).eval()

    def make_kwargs(batch=1, grid=(3, 5), text=7, seed=0):
        g = torch.Generator().manual_seed(seed)
        h, w = grid
        img_ids = grid_ids(h, w, prefix=(0,), suffix=(0,))          # (T, H, W, L) coordinates like the pipeline
        txt_ids = grid_ids(text, prefix=(0, 0, 0))
        return dict(hidden_states=randn(g, batch, h * w, 4), encoder_hidden_states=randn(g, batch, text, 16),
                    timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 4.0),
                    img_ids=img_ids.expand(batch, -1, -1), txt_ids=txt_ids.expand(batch, -1, -1), return_dict=False)
    return tr, make_kwargs


def tiny_flux2(seed: int = 0):
    """Flux2Pipeline without its Mistral-3 text encoder: call it with ``prompt_embeds`` (tiny_call_kwargs does)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    transformer, _ = tiny_flux2_transformer(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    return eval_pipe(Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                   tokenizer=None, transformer=transformer))


def tiny_qwenimage_transformer(seed: int = 0, heads: int = 3, head_dim: int = 16, layers: int = 2,
                               zero_cond_t: bool = False):
    """3 heads by default: divides neither 2 nor 4 (Ulysses must refuse or pad). ``zero_cond_t=True``: the
    Qwen-Image-Edit-2511 layout, where reference-image tokens follow the target tokens and get the t=0
    modulation through a per-token ``modulate_index`` (make_kwargs then appends a (1, h, w) reference image)."""
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(seed)
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=layers,
                                     attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=16,
                                     guidance_embeds=False, axes_dims_rope=(8, 4, 4), zero_cond_t=zero_cond_t).eval()

    def make_kwargs(batch=1, grid=(3, 5), text=7, seed=0, text_pad=0):
        """``text_pad`` > 0 masks that many trailing text tokens of the last sample (a real padding mask)."""
        g = torch.Generator().manual_seed(seed)
        h, w = grid
        mask = None
        if text_pad:
            mask = torch.ones(batch, text, dtype=torch.long)
            mask[-1, text - text_pad:] = 0
        shapes = [(1, h, w), (1, h, w)] if zero_cond_t else [(1, h, w)]
        return dict(hidden_states=randn(g, batch, len(shapes) * h * w, 16),
                    encoder_hidden_states=randn(g, batch, text, 16), encoder_hidden_states_mask=mask,
                    timestep=torch.full((batch,), 0.5), img_shapes=[shapes] * batch, return_dict=False)
    return tr, make_kwargs


def tiny_qwenimage(seed: int = 0):
    """QwenImagePipeline without its Qwen2.5-VL encoder: call it with ``prompt_embeds`` (tiny_call_kwargs does)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    transformer, _ = tiny_qwenimage_transformer(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return eval_pipe(QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                       tokenizer=None, transformer=transformer))
