"""Tiny random-weight Flux / SD3 / PixArt pipelines built fully offline (hand-built tokenizers).

For tests and for trying the integration without downloading weights. Every component is put in eval
mode (fresh transformers modules train with dropout, which would make runs non-deterministic).
"""
from __future__ import annotations

import torch


def _clip_tokenizer():
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in "a cat and dog red blue photo of".split()]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -2.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip(with_projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu", projection_dim=32)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _t5():
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0))


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _eval(pipe):
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    return _eval(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=_clip(),
                              tokenizer=_clip_tokenizer(), text_encoder_2=_t5(), tokenizer_2=_t5_tokenizer(),
                              transformer=transformer))


def tiny_sd3(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96)
    return _eval(StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), text_encoder=_clip(True), tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip(True), tokenizer_2=_clip_tokenizer(), text_encoder_3=_t5(), tokenizer_3=_t5_tokenizer(),
        transformer=transformer))


def tiny_pixart(seed: int = 0):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=32, num_layers=2, patch_size=1, attention_head_dim=8,
                                           num_attention_heads=4, caption_channels=32, in_channels=4,
                                           cross_attention_dim=32, out_channels=8)
    return _eval(PixArtAlphaPipeline(tokenizer=_t5_tokenizer(), text_encoder=_t5(), vae=_vae(4),
                                     transformer=transformer, scheduler=DDIMScheduler()))


TINY = {"flux": tiny_flux, "sd3": tiny_sd3, "pixart": tiny_pixart}


def tiny_call_kwargs(family: str, height: int = 32, width: int = 32, steps: int = 3, seed: int = 0) -> dict:
    kw = dict(prompt="a photo of a red cat", height=height, width=width, num_inference_steps=steps,
              generator=torch.Generator().manual_seed(seed), output_type="np")
    if family == "flux":
        kw.update(max_sequence_length=16, guidance_scale=3.5)
    elif family == "sd3":
        kw.update(max_sequence_length=16, guidance_scale=5.0)
    else:
        kw.update(use_resolution_binning=False, max_sequence_length=16, guidance_scale=4.5)
    return kw
