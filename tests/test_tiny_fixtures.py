"""The tiny random-weight fixtures: every family builds offline, runs, and is bitwise reproducible per seed.

Single process. Also pins the facts the parallel integration relies on: how many transformer calls a pipeline
makes per denoising step (branches), that Wan 2.2 uses both transformers, that TI2V passes per-token
timesteps, and that the masks the fixtures advertise are really not all-ones.
"""
import numpy as np
import pytest
import torch

from compactfusion.testing.tiny import TINY, TINY_TRANSFORMERS, VIDEO_FAMILIES, tiny_call_kwargs

# image grids (h, w) and video grids (f, h, w) of 15 tokens: divide neither by 2 nor by 4
GRID = {fam: ((1, 3, 5) if fam in VIDEO_FAMILIES else (3, 5)) for fam in TINY_TRANSFORMERS}
TEXT = {"cogvideox": 16}  # fixed by its config (max_text_seq_length)

# transformer calls per denoising step with tiny_call_kwargs: 1 = one (CFG-batched or distilled) call,
# 2 = separate conditional and unconditional calls sharing a timestep
CALLS_PER_STEP = {"flux": 1, "flux_controlnet": 1, "sd3": 1, "pixart": 1, "flux2": 1, "qwenimage": 2, "wan": 2, "wan22": 2,
                  "wan22_ti2v": 2, "ltx": 1, "cogvideox": 1, "hunyuanvideo": 2, "hunyuanvideo15": 2}


def _forward(family, seed, kw_seed=0, batch=2):
    tr, make_kwargs = TINY_TRANSFORMERS[family](seed)
    kw = make_kwargs(batch=batch, grid=GRID[family], text=TEXT.get(family, 7), seed=kw_seed)
    with torch.no_grad():
        return tr, kw, tr(**kw)[0]


def _tokens(family, out):
    """Image tokens of an output, from its layout (packed (B, S, C) or a latent grid)."""
    if out.ndim == 3:
        return out.shape[1]
    patch = {"sd3": 1, "pixart": 1, "wan": 2, "cogvideox": 2, "hunyuanvideo": 1, "hunyuanvideo15": 1}[family]
    if family == "cogvideox":  # (B, F, C, H, W)
        return out.shape[1] * (out.shape[3] // patch) * (out.shape[4] // patch)
    spatial = out.shape[-2:] if out.ndim == 4 else out.shape[-3:]
    n = 1
    for i, s in enumerate(spatial):
        n *= s if (out.ndim == 5 and i == 0) else s // patch
    return n


@pytest.mark.parametrize("family", sorted(TINY_TRANSFORMERS))
def test_transformer_forward_is_seeded_and_bitwise_reproducible(family):
    _, _, a = _forward(family, seed=0)
    _, _, b = _forward(family, seed=0)
    _, _, c = _forward(family, seed=1)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), "same seed must give bitwise the same output"
    assert not torch.equal(a, c), "a different seed must give different weights"
    assert a.shape[0] == 2 and _tokens(family, a) == 15


def test_transformer_configs_cover_awkward_heads_and_masks():
    assert TINY_TRANSFORMERS["qwenimage"](0)[0].config.num_attention_heads == 3  # divides neither 2 nor 4
    _, kw, _ = _forward("qwenimage", 0, batch=2)
    assert kw["encoder_hidden_states_mask"] is None
    tr, mk = TINY_TRANSFORMERS["qwenimage"](0)
    assert mk(batch=2, text=7, text_pad=2)["encoder_hidden_states_mask"].sum().item() == 12
    for fam in ("ltx", "pixart"):
        assert TINY_TRANSFORMERS[fam](0)[1](batch=2, text=7, text_pad=3)["encoder_attention_mask"].sum().item() == 11
    # HunyuanVideo's pipeline always pads text, so its fixture does too
    assert not TINY_TRANSFORMERS["hunyuanvideo"](0)[1]()["encoder_attention_mask"].all()
    with pytest.raises(ValueError, match="max_text_seq_length"):
        TINY_TRANSFORMERS["cogvideox"](0)[1](text=7)


def test_wan_per_token_timestep_forward():
    tr, mk = TINY_TRANSFORMERS["wan"](0)
    kw = mk(batch=1, grid=(2, 3, 5), per_token_timestep=True)
    assert kw["timestep"].shape == (1, 30)
    with torch.no_grad():
        per_token = tr(**kw)[0]
        kw["timestep"] = torch.full((1,), 500.0)
        uniform = tr(**kw)[0]
    assert torch.isfinite(per_token).all() and not torch.equal(per_token, uniform)


def test_variants_wan_i2v_and_qwenimage_edit_reference_tokens():
    from compactfusion.testing.tiny_image import tiny_qwenimage_transformer
    from compactfusion.testing.tiny_video import tiny_wan_transformer
    tr, mk = tiny_wan_transformer(0, i2v=True)
    with pytest.raises(ValueError, match="512 text tokens"):
        mk()
    kw = mk(batch=1, grid=(1, 3, 5), text=512)
    with torch.no_grad():
        with_image = tr(**kw)[0]
        kw["encoder_hidden_states_image"] = torch.zeros_like(kw["encoder_hidden_states_image"])
        without = tr(**kw)[0]
    assert torch.isfinite(with_image).all() and not torch.equal(with_image, without)
    tr, mk = tiny_qwenimage_transformer(0, zero_cond_t=True)
    kw = mk(batch=2, grid=(3, 5))
    assert kw["hidden_states"].shape[1] == 30 and len(kw["img_shapes"][0]) == 2  # target + reference tokens
    with torch.no_grad():
        assert tr(**kw)[0].shape == (2, 30, 16)


def _run_pipeline(family, seed=0, steps=2, **overrides):
    pipe = TINY[family](seed)
    calls = []
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: calls.append((name, kwargs["timestep"].clone(), kwargs)),
                with_kwargs=True)
    out = pipe(**tiny_call_kwargs(family, steps=steps, seed=seed, **overrides))
    return np.asarray(out.frames if family in VIDEO_FAMILIES else out.images), calls


@pytest.mark.parametrize("family", sorted(TINY))
def test_pipeline_two_steps_bitwise_reproducible(family):
    a, calls = _run_pipeline(family)
    b, _ = _run_pipeline(family)
    assert np.isfinite(a).all() and a.size > 0
    assert np.array_equal(a, b), "same seed must give bitwise the same output"
    assert len(calls) == 2 * CALLS_PER_STEP[family], calls
    # calls within one step share the timestep; consecutive steps differ
    per_step = [calls[i:i + CALLS_PER_STEP[family]] for i in range(0, len(calls), CALLS_PER_STEP[family])]
    for step in per_step:
        assert all(torch.equal(t, step[0][1]) for _, t, _ in step)
    assert not torch.equal(per_step[0][0][1], per_step[1][0][1])
    if family == "wan22":
        assert [n for n, _, _ in calls] == ["transformer", "transformer", "transformer_2", "transformer_2"]
    if family == "flux_controlnet":
        assert all(kw["controlnet_block_samples"][0].shape[1] == kw["hidden_states"].shape[1] for _, _, kw in calls)
    if family == "wan22_ti2v":
        assert calls[0][1].ndim == 2, "expand_timesteps must pass a (batch, tokens) timestep"


def test_branch_variants_flux_true_cfg_and_sd3_skip_layer_guidance():
    _, calls = _run_pipeline("flux", true_cfg_scale=2.0, negative_prompt="a dog")
    assert len(calls) == 4 and torch.equal(calls[0][1], calls[1][1]) and not torch.equal(calls[1][1], calls[2][1])
    _, calls = _run_pipeline("sd3", steps=3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                             skip_layer_guidance_stop=1.0)
    shapes = [(kw["hidden_states"].shape[0], kw.get("skip_layers")) for _, _, kw in calls]
    assert shapes == [(2, None), (2, None), (1, [1]), (2, None), (1, [1])], shapes  # CFG batch, then SLG branch


def test_call_kwargs_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_call_kwargs("sdxl")
