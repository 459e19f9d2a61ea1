"""bench project, strategy="pipefusion": bytes from the library's stage_traffic and codec sizes; latency model."""
from __future__ import annotations

import math

import pytest

from compactfusion.bench import project as P
from compactfusion.codecs import get_codec
from compactfusion.parallel.pipefusion import stage_traffic


def _expected_step_bytes(m, codec, w, patches, text="first"):
    """Bytes all stages send in one coded step, built independently from stage_traffic and the codec."""
    passes = patches if text == "every" else 1  # the passes of a step that run (and carry) the joint text
    st = stage_traffic(m.image_tokens, m.text_tokens, m.channels, m.out_channels, w, patches, m.text_tokens > 0,
                       passes)
    out = m.batch * st["out"] * 2  # raw fp16
    if codec == "none":
        return m.batch * st["boundary"] * 2 + out
    enc = get_codec(codec).encoded_nbytes
    sizes = [m.image_tokens // patches + (i < m.image_tokens % patches) for i in range(patches)]
    per_boundary = sum(enc(m.batch * n, m.channels) for n in sizes)
    per_boundary += passes * enc(m.batch * m.text_tokens, m.channels) if m.text_tokens else 0
    # the codec bytes are stage_traffic's elements at the codec's bits plus per-stream scales: never fewer
    bits = {"int8": 8, "int4": 4, "int2": 2, "binary": 1}[codec]
    assert per_boundary * (w - 1) >= m.batch * st["boundary"] * bits // 8
    return (w - 1) * per_boundary + out


@pytest.mark.parametrize("mk", ["flux-dev-1024", "sd3-medium-1024", "wan21-14b-720p"])
def test_pipefusion_rows_bytes_are_stage_traffic_times_codec(mk):
    m = P.MODELS[mk]
    codecs = ["none", "int8", "int4", "binary"]
    rows = P.build_rows([mk], ["pipefusion"], codecs, [2, 4], [], {})
    texts = P.PIPE_TEXT if m.text_tokens else (None,)
    assert {(r["codec"], r["world_size"], r["num_patches"], r["pipefusion_text"]) for r in rows} == \
        {(c, w, f * w, t) for c in codecs for w in (2, 4) for f in P.PATCH_FACTORS for t in texts}
    for r in rows:
        w, patches, text = r["world_size"], r["num_patches"], r["pipefusion_text"] or "first"
        coded = _expected_step_bytes(m, r["codec"], w, patches, text)
        warm = _expected_step_bytes(m, "none", w, patches, text)  # the synchronous first step, at fp16
        warm_steps = r["warmup_steps"]
        total = warm_steps * warm + (m.steps - warm_steps) * coded  # all stages, one image
        assert r["bytes_per_image"] == round(total / w)  # the row reports the mean over the W stages
        assert r["bytes_per_step"] == round(coded / w)
        assert r["text_mode"] == ({"first": "carried once", "every": "carried"}[text] if m.text_tokens
                                  else "cross-attention")
    # each rank holds 1/W of the blocks plus the replicated parts; ring holds everything
    r4 = next(r for r in rows if r["world_size"] == 4)
    assert r4["param_bytes_per_rank"] == round((m.params_blocks / 4 + m.params_other) * 2)
    ring = P.build_rows([mk], ["ring"], ["none"], [4], [], {})[0]
    assert ring["param_bytes_per_rank"] == (m.params_blocks + m.params_other) * 2


def test_pipefusion_latency_grows_as_bandwidth_falls():
    m = P.MODELS["flux-dev-1024"]
    t = P.default_step_time(m)
    bws = [math.inf, 25e9, 1e9, 500e6, 100e6, 20e6, 5e6]
    for codec in ("none", "int4", "binary"):
        for patches in (4, 8):
            ts = [P.predict_latency(m, "pipefusion", codec, 4, P.Link("l", "l", bw, 0.0), t, num_patches=patches)
                  for bw in bws]
            assert all(a <= b for a, b in zip(ts, ts[1:])), (codec, patches, ts)
            assert ts[-1] > ts[0]
    # unlimited link: M + W - 1 slots of compute per step plus the synchronous step; a slot is one patch and the
    # text's share: all of it when every pass runs the text, 1/M of it when only the first pass does
    s = m.image_tokens + m.text_tokens
    for text, text_rows in (("every", m.text_tokens), ("first", m.text_tokens / 4)):
        ts = P.predict_latency(m, "pipefusion", "int4", 4, P.Link("u", "u", math.inf, 0.0), t, num_patches=4,
                               pipefusion_text=text)
        share = sum(m.flops(1024 + text_rows, s)) / sum(m.flops(s, s))
        assert ts == pytest.approx(t + (m.steps - 1) * 7 * t * share / 4), text
    # compression pays once the link is slow enough for the slots to wait on their sends
    slow = P.Link("s", "s", 5e6, 0.0)
    assert P.predict_latency(m, "pipefusion", "int4", 4, slow, t) < P.predict_latency(m, "pipefusion", "none", 4, slow, t)


def test_pipefusion_refused_where_the_runtime_refuses():
    assert P.feasible(P.MODELS["pixart-alpha-1024"], "pipefusion", 4)
    assert P.feasible(P.MODELS["flux-dev-1024"], "pipefusion", 4) is None
    with pytest.raises(ValueError, match="num_patches"):
        P.pipe_traffic(P.MODELS["flux-dev-1024"], "int4", 4, 0)
