"""codec="auto": the pure policy with fake timings, codec timing at a shape, and (2 gloo ranks) the link probe
and the agreement of measured numbers across ranks."""
from __future__ import annotations

import math

import pytest
import torch

from compactfusion.codecs import get_codec
from compactfusion.parallel.auto import AutoPlan, bits_per_element, choose_codec, measure_coding_times

SHAPE, DT = (1088, 3072), torch.bfloat16
CANDS = ("binary", "int2", "int4", "int8")


def fake_times(spec, shape, dtype):  # finer codecs cost a little more, all far from free
    return {"binary": (1e-3, 1e-3), "int2": (1.2e-3, 1.2e-3), "int4": (1.3e-3, 1.3e-3), "int8": (1.4e-3, 1.4e-3)}[spec]


def test_fast_link_picks_uncompressed_slow_link_picks_smallest():
    fast = choose_codec(CANDS, SHAPE, DT, math.inf, 0.0, fake_times, messages=3)
    assert fast.spec == "none" and fast.predicted_s == 0.0
    slow = choose_codec(CANDS, SHAPE, DT, 1e6, 20e-6, fake_times, messages=3)
    assert slow.spec == "binary"
    n = get_codec("binary").encoded_nbytes(*SHAPE)
    assert math.isclose(slow.predicted_s, 1e-3 + 3 * 1e-3 + 3 * (20e-6 + n / 1e6), rel_tol=1e-12)
    assert set(slow.table) == {"none", *CANDS} and min(slow.table.values()) == slow.predicted_s


def test_floor_and_margin_and_ties():
    assert choose_codec(CANDS, SHAPE, DT, 1e6, 0.0, fake_times, floor="int2").spec == "int2"
    allowed = choose_codec(CANDS, SHAPE, DT, 1e6, 0.0, fake_times, floor="int4").table
    assert set(allowed) == {"none", "int4", "int8"}
    assert bits_per_element("int2", SHAPE, DT) < bits_per_element("int4", SHAPE, DT)
    # a middling link: binary only barely beats uncompressed -> a 50 % margin keeps uncompressed
    raw = SHAPE[0] * SHAPE[1] * 2
    bw = raw / 2.2e-3  # uncompressed 2.2 ms on the wire, binary ~2.07 ms all in
    assert choose_codec(("binary",), SHAPE, DT, bw, 0.0, fake_times).spec == "binary"
    assert choose_codec(("binary",), SHAPE, DT, bw, 0.0, fake_times, margin=0.5).spec == "none"
    free = choose_codec(CANDS, SHAPE, DT, math.inf, 0.0, lambda *a: (0.0, 0.0))
    assert free.spec == "none"  # equal predicted time: the finer one wins
    with pytest.raises(ValueError, match="invalid codec spec"):
        choose_codec(CANDS, SHAPE, DT, 1e6, 0.0, fake_times, floor="int3")
    with pytest.raises(ValueError, match="bandwidth"):
        choose_codec(CANDS, SHAPE, DT, 0, 0.0, fake_times)
    with pytest.raises(ValueError, match="finite times"):
        choose_codec(CANDS, SHAPE, DT, 1e6, 0.0, lambda *a: (math.nan, 0.0))


def test_auto_plan_and_measured_times():
    times = measure_coding_times(["none", "binary", "int2"], (64, 128), torch.float32, reps=1)
    assert times["none"] == (0.0, 0.0) and all(e > 0 and d > 0 for e, d in (times["binary"], times["int2"]))
    plan = AutoPlan(("binary", "int2"), floor="int2")
    assert plan(0, 5) == "none" and not plan.decided(0) and plan.raw_layer(0)
    c = plan.decide(0, (64, 128), torch.float32, 1e3, 0.0, times, messages=1)
    assert plan.decided(0) and plan(0, 9) == c.spec == "int2"  # binary is below the floor
    assert not plan.raw_layer(0)  # a coded layer goes through the residual coder
    plan.decide(1, (64, 128), torch.float32, math.inf, 0.0, times, messages=1)
    assert plan(1, 9) == "none" and plan.raw_layer(1)  # an uncompressed layer bypasses it
    assert plan.stats()[0]["codec"] == "int2" and "binary" not in plan.stats()[0]["candidates_s"]
    plan.reset()
    assert plan(0, 9) == "none"
    from compactfusion.residual import CompressionConfig
    cfg = CompressionConfig(codec="binary", plan=plan)  # usable as a plan
    assert cfg.spec_for(0, 3) == "none"


def _probe_main(rank, world):
    import torch

    from compactfusion.comm import Communicator, LinkModel
    from compactfusion.comm.probe import agree_max, probe_link
    from compactfusion.parallel.auto import agreed_coding_times

    from compactfusion.parallel.auto import AutoController, AutoPlan

    comm = Communicator(None, LinkModel("1MB/s", "20ms", "sleep"), timeout_s=20.0)
    est = probe_link(comm, small=8, large=64 * 1024, reps=2)
    agreed = agreed_coding_times(comm, {"binary": (1e-3 * (rank + 1), 5e-4), "int2": (2e-3, 1e-4 * rank)})
    # the controller: virtual link -> the model's numbers, no probe; decisions identical on both ranks
    virt = Communicator(None, LinkModel("100kB/s", "20ms", "virtual"), timeout_s=20.0)
    ctl = AutoController(AutoPlan(("binary", "int4")), virt, reps=1)
    choice = ctl.ensure(0, (64, 128), torch.float32, "cpu", messages=1)
    again = ctl.ensure(0, (64, 128), torch.float32, "cpu", messages=1)  # same shape: no new measurement
    # end to end through a real ParallelContext (the two calls the context makes before each attention)
    from compactfusion.parallel import ParallelConfig, ParallelContext
    from compactfusion.parallel.auto import auto_compression, controller_for, ensure_attention
    picked = {}
    for name, link in (("slow", LinkModel("100kB/s", "20ms", "virtual")), ("fast", LinkModel(None, 0, "virtual"))):
        ctx = ParallelContext(ParallelConfig(strategy="ring", link=link, timeout_s=20.0,
                                             compression=auto_compression(("binary", "int4"), warmup_steps=1)))
        actl = controller_for(ctx)
        g = torch.Generator().manual_seed(5)
        for step in range(3):
            q, k, v = (torch.randn(1, 16, 2, 8, generator=g) for _ in range(3))
            for layer in range(2):
                ensure_attention(ctx, actl, q, layer)
                ctx.attention(q, k, v, layer=layer, step=step)
        ctx.check_consistency(2)  # sender and receiver agree under the chosen codec
        picked[name] = (actl.plan.stats()[0]["codec"], actl.plan.stats()[1]["codec"],
                        ctx.ledger.summary()["compression_ratio_after_warmup"])
        if name == "fast":  # uncompressed layers keep no residual state and give the uncompressed result
            picked["fast_streams"] = len(ctx.coder.checksums())
            plain = ParallelContext(ParallelConfig(strategy="ring", link=link, timeout_s=20.0))
            picked["fast_equal"] = torch.equal(ctx.attention(q, k, v, layer=0, step=3),
                                               plain.attention(q, k, v, layer=0, step=3))
            plain.close()
        ctx.close()
    return (est, agreed, agree_max(comm, [rank * 0.5, 1.0]), comm.ledger.summary()["bytes_sent"],
            (ctl.link, choice.spec, choice.table, again is choice), picked)


@pytest.mark.dist
def test_probe_and_agreement_2_ranks():
    from distributed import run_distributed
    res = run_distributed(_probe_main, 2, timeout=90)
    (e0, a0, m0, sent0, c0, p0), (e1, a1, m1, _, c1, p1) = res
    assert p0 == p1 and p0["slow"][:2] == ("binary", "binary") and p0["slow"][2] > 8, p0
    assert p0["fast"] == ("none", "none", 1.0), p0
    assert p0["fast_streams"] == 0 and p0["fast_equal"], p0
    assert e0 == e1 and a0 == a1 and m0 == m1 == [0.5, 1.0] and c0 == c1  # identical on every rank
    assert c0[0] == (1e5, 0.02) and c0[1] == "binary" and c0[3], c0  # 32 kB raw at 100 kB/s: the smallest wins
    assert a0 == {"binary": (2e-3, 5e-4), "int2": (2e-3, 1e-4)}
    # the emulated link (sleep mode pads each hop to the model): latency 20 ms, bandwidth 1 MB/s; loopback
    # hops on the loaded 2-core CI machine take 4-15 ms, hence the wide bounds
    assert 10e-3 < e0.latency_s < 40e-3, e0
    assert 0.5e6 < e0.bandwidth_Bps < 1.5e6, e0
    assert sent0 == 0  # the probe does not show up in the data ledger
