"""Shared pieces of the tiny fixtures: hand-built tokenizers, tiny text encoders, seeded inputs, eval mode."""
from __future__ import annotations

import torch


def clip_tokenizer():
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in "a cat and dog red blue photo of".split()]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -2.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip(with_projection=False, hidden_size=32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, hidden_size=hidden_size, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
                         projection_dim=32)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def t5(d_model=32):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=1000, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0))


def umt5(d_model=32):
    # Wan's text encoder class; same tiny size as the T5 one (the tokenizer is the hand-built T5 one).
    from transformers import UMT5Config, UMT5EncoderModel
    return UMT5EncoderModel(UMT5Config(vocab_size=1000, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0))


def eval_pipe(pipe):
    """Every module in eval mode (fresh transformers modules train with dropout) and no progress bar."""
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randn(gen: torch.Generator, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def grid_ids(*axes: int, prefix=(), suffix=()) -> torch.Tensor:
    """(prod(axes), len(prefix)+len(axes)+len(suffix)) integer position ids over a grid (row-major)."""
    mesh = torch.cartesian_prod(*[torch.arange(n) for n in axes]) if len(axes) > 1 else torch.arange(axes[0])[:, None]
    n = mesh.shape[0]
    cols = [torch.full((n, 1), v) for v in prefix] + [mesh] + [torch.full((n, 1), v) for v in suffix]
    return torch.cat(cols, dim=1).float()
