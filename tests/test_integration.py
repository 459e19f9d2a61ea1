"""Integration behaviours that must never be silently wrong (2 gloo ranks, one spawned group).

Steps vs branches (true CFG), two transformers (Wan 2.2), unroutable attention backends and processors,
ControlNet residuals on a bare transformer, regional torch.compile, request batches with their own streams.
"""
import numpy as np
import pytest

from distributed import run_distributed

pytestmark = pytest.mark.dist


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test reads the type and message
        return f"{type(e).__name__}: {e}"
    return None


def _worker(rank, world):
    import torch
    import compactfusion as cf
    from compactfusion.testing.tiny import TINY, TINY_TRANSFORMERS, tiny_call_kwargs

    res = {}
    # -- true CFG: two transformer calls per step are branches of one step -------------------------------
    pipe = TINY["flux"]()
    kw = lambda: dict(tiny_call_kwargs("flux", 36, 38, steps=4), true_cfg_scale=2.0, negative_prompt="a dog")  # noqa: E731
    ref = pipe(**kw()).images
    cf.parallelize(pipe, cf.ParallelConfig(strategy="ring"))
    out = pipe(**kw()).images
    st = cf.stats(pipe)
    res["truecfg"] = dict(diff=float(np.abs(out - ref).max()), steps=st["steps"], branches=st["branches"],
                          calls=st["transformer_calls"])
    cf.unparallelize(pipe)
    cf.parallelize(pipe, cf.ParallelConfig(strategy="ring", compression="binary"))
    out = pipe(**kw()).images
    keys = list(cf.context(pipe).checksums())
    res["truecfg_binary"] = dict(finite=bool(np.isfinite(out).all()),
                                 branch_streams=sum(1 for k in keys if k[0] == "branch"), streams=len(keys))
    # the branch's warmup: its first step travels at full precision like the conditional branch's
    rec = cf.context(pipe).ledger.records()
    res["truecfg_warmup_records"] = sum(1 for r in rec if r["warmup"])
    cf.unparallelize(pipe)

    # -- unroutable backends: refused at parallelize, or at the first call when set afterwards -------------
    t = pipe.transformer
    cf.parallelize(pipe, cf.ParallelConfig(strategy="ring"))
    t.set_attention_backend("flex")
    res["flex_after"] = _error(lambda: pipe(**tiny_call_kwargs("flux", 36, 38)))
    cf.unparallelize(pipe)
    res["flex_before"] = _error(lambda: cf.parallelize(pipe, cf.ParallelConfig(strategy="ring")))
    t.set_attention_backend("native")

    # -- a processor that attends without SDPA: counted, raises instead of attending locally -------------
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class ManualAttention(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            import torch.nn.functional as F
            orig = F.scaled_dot_product_attention

            def manual(query, key, value, **_):
                q, k, v = query, key, value
                w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
                return w @ v
            F.scaled_dot_product_attention = manual  # what a custom kernel does: SDPA is never called
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            finally:
                F.scaled_dot_product_attention = orig
    blk = t.single_transformer_blocks[0].attn
    saved = blk.processor
    blk.set_processor(ManualAttention())
    cf.parallelize(pipe, cf.ParallelConfig(strategy="ring"))
    res["manual"] = _error(lambda: pipe(**tiny_call_kwargs("flux", 36, 38)))
    cf.unparallelize(pipe)
    blk.set_processor(saved)

    # -- bare transformer, ControlNet residuals (full length, split with the image tokens) -----------------
    transformer, make = TINY_TRANSFORMERS["flux"]()
    base = make(batch=2, grid=(9, 10), text=7)
    S = base["hidden_states"].shape[1]
    g = torch.Generator().manual_seed(3)
    c = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    control = dict(controlnet_block_samples=[torch.randn(2, S, c, generator=g)],
                   controlnet_single_block_samples=[torch.randn(2, S, c, generator=g)])
    calls = [dict(base, **control, timestep=base["timestep"] * f) for f in (1.0, 0.6)]
    with torch.no_grad():
        ref = [transformer(**a)[0] for a in calls]
        cf.parallelize(transformer, cf.ParallelConfig(strategy="ulysses"))
        got = [transformer(**a)[0] for a in calls]
        steps = cf.stats(transformer)["steps"]
        cf.reset(transformer)
        again = transformer(**calls[0])[0]
    res["controlnet"] = dict(diff=max(float((a - b).abs().max()) for a, b in zip(ref, got)), steps=steps,
                             reset_diff=float((again - ref[0]).abs().max()), reset_steps=cf.stats(transformer)["steps"])
    cf.unparallelize(transformer)

    # -- torch.compile: regional compilation runs exact; whole-model compilation is refused -------------------
    pipe = TINY["flux"]()
    ref = pipe(**tiny_call_kwargs("flux", 36, 38)).images
    cf.parallelize(pipe, cf.ParallelConfig(strategy="ring"))
    pipe.transformer.compile_repeated_blocks(backend="aot_eager")  # dynamo tracing without a C++ toolchain
    res["compile_regional"] = float(np.abs(pipe(**tiny_call_kwargs("flux", 36, 38)).images - ref).max())
    cf.unparallelize(pipe)
    pipe = TINY["flux"]()
    pipe.transformer.compile(backend="aot_eager")
    res["compile_whole_before"] = _error(lambda: cf.parallelize(pipe, cf.ParallelConfig(strategy="ring")))

    # -- Wan 2.2: both transformers parallelized, each with its own streams ------------------------------
    pipe = TINY["wan22"]()
    kw = lambda: tiny_call_kwargs("wan22", steps=4)  # noqa: E731
    ref = pipe(**kw()).frames
    cf.parallelize(pipe, cf.ParallelConfig(strategy="ring"))
    out = pipe(**kw()).frames
    st = cf.stats(pipe)
    res["wan22"] = dict(diff=float(np.abs(np.asarray(out) - np.asarray(ref)).max()), plans=st["plans"], steps=st["steps"],
                        calls=st["transformer_calls"], branches=st["branches"])
    cf.unparallelize(pipe)

    # -- video with CFG parallel: LTX batches cond/uncond in one call; each half runs on one rank ----------
    pipe = TINY["ltx"]()
    ref = np.asarray(pipe(**tiny_call_kwargs("ltx", steps=3)).frames)
    cf.parallelize(pipe, cf.ParallelConfig(strategy="none", cfg_parallel=True))
    res["ltx_cfg"] = float(np.abs(np.asarray(pipe(**tiny_call_kwargs("ltx", steps=3)).frames) - ref).max())
    cf.unparallelize(pipe)

    # -- request batches: each request's images get their own streams (serving) --------------------------
    pipe = TINY["flux"]()
    cf.parallelize(pipe, cf.ParallelConfig(strategy="ring", compression="int4"))

    def images(prompts, seeds):
        k = tiny_call_kwargs("flux", 36, 38, steps=4)
        k.update(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds])
        return pipe(**k).images
    alone = [images(["a photo of a red cat"], [s]) for s in (0, 1)]
    cf.set_request_batches(pipe, [1, 1])
    both = images(["a photo of a red cat"] * 2, [0, 1])
    cf.set_request_batches(pipe, None)
    res["batched"] = max(float(np.abs(both[i] - alone[i][0]).max()) for i in range(2))
    cf.unparallelize(pipe)
    return res


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2, timeout=600)


def test_true_cfg_branches(results):
    for r in results:
        assert r["truecfg"]["diff"] <= 1e-4, r["truecfg"]
        assert r["truecfg"]["steps"] == 4 and r["truecfg"]["calls"] == 8 and r["truecfg"]["branches"] == 2, r
        assert r["truecfg_binary"]["finite"]
        # one stream set per branch: the unconditional branch has as many streams as the conditional one
        assert r["truecfg_binary"]["branch_streams"] * 2 == r["truecfg_binary"]["streams"], r["truecfg_binary"]
        assert r["truecfg_warmup_records"] > 0


def test_unroutable_attention_raises(results):
    for r in results:
        for case in ("flex_after", "flex_before"):
            assert r[case] and r[case].startswith("UnsupportedAttentionError") and "'flex'" in r[case], r[case]
            assert "transformer_blocks.0.attn" in r[case]
        assert r["manual"] and r["manual"].startswith("UnroutedAttentionError"), r["manual"]
        assert "single_transformer_blocks.0.attn" in r["manual"]


def test_bare_transformer_with_controlnet(results):
    for r in results:
        c = r["controlnet"]
        assert c["diff"] <= 1e-4 and c["steps"] == 2, c
        assert c["reset_diff"] <= 1e-4 and c["reset_steps"] == 1, c


def test_compile(results):
    for r in results:
        assert r["compile_regional"] <= 1e-4
        assert r["compile_whole_before"] and "compile_repeated_blocks" in r["compile_whole_before"]


def test_wan22_two_transformers(results):
    for r in results:
        w = r["wan22"]
        assert w["diff"] <= 1e-4, w
        assert set(w["plans"]) == {"transformer", "transformer_2"}, w
        assert w["calls"] == 8 and w["branches"] >= 4, w  # cond+uncond per step, streams per transformer
        assert w["steps"] == 4, w  # denoising steps over both transformers


def test_request_batches_match_single_requests(results):
    for r in results:
        assert r["batched"] <= 1e-4, r["batched"]


def test_ltx_cfg_parallel(results):
    for r in results:
        assert r["ltx_cfg"] <= 1e-4, r["ltx_cfg"]


def test_every_unroutable_backend_is_refused():
    """Every diffusers backend outside the SDPA family is refused by name; the SDPA ones pass."""
    from types import SimpleNamespace

    from diffusers.models.attention_dispatch import AttentionBackendName

    from compactfusion.integrations.diffusers.router import (ROUTABLE_BACKENDS, UnsupportedAttentionError,
                                                             check_backend)
    names = [b.value for b in AttentionBackendName]
    assert len(names) > 10
    for name in names:
        module = SimpleNamespace(processor=SimpleNamespace(_attention_backend=name))
        if name in ROUTABLE_BACKENDS:
            check_backend(module, "blocks.0.attn")
        else:
            with pytest.raises(UnsupportedAttentionError, match=rf"'{name}' attention backend"):
                check_backend(module, "blocks.0.attn")
