"""Residual coding: config validation, sender/receiver bitwise agreement, error feedback, orders, NaN policy."""
import pytest
import torch

import compactfusion as cf
from compactfusion.codecs import get_codec
from compactfusion.residual import NonFiniteError, ResidualDecoder, ResidualEncoder, layer_plan, payload_nbytes

CODECS = ["binary", "int2", "int4", "int8", "lowrank:4", "lowrank-int4:8", "topk:4", "fp16", "bf16"]


def ar1_sequence(steps=30, n=64, c=48, rho=0.95, seed=0):
    """Temporally correlated activations: x_t = rho x_{t-1} + sqrt(1-rho^2) eps, plus a fixed offset."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(n, c, generator=g) * 3
    x = torch.randn(n, c, generator=g)
    seq = []
    for _ in range(steps):
        x = rho * x + (1 - rho**2) ** 0.5 * torch.randn(n, c, generator=g)
        seq.append(offset + x)
    return seq


def run_pair(cfg, seq, key=("L", "k", 0)):
    enc, dec = ResidualEncoder(cfg), ResidualDecoder(cfg)
    errors = []
    for step, x in enumerate(seq):
        payload, x_hat_sender = enc.encode_with_reconstruction(key, x, step)
        x_hat = dec.decode(key, payload, step, tuple(x.shape), x.dtype)
        if cfg.error_feedback or cfg.residual_order == 0:  # without EF the ablation diverges on purpose
            assert torch.equal(x_hat, x_hat_sender), f"sender and receiver reconstructions differ at step {step}"
        errors.append(((x_hat.float() - x.float()).norm() / x.float().norm()).item())
    return enc, dec, errors


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("order", [0, 1, 2])
def test_sender_receiver_bitwise_identical_over_50_steps(codec, order):
    cfg = cf.CompressionConfig(codec=codec, residual_order=order, error_feedback=order > 0, warmup_steps=1)
    enc, dec, _ = run_pair(cfg, ar1_sequence(steps=50, n=33, c=20))
    if order > 0:
        for key, st in enc.streams.items():
            assert torch.equal(st.base, dec.streams[key].base)
            if order == 2:
                assert torch.equal(st.delta, dec.streams[key].delta)
        assert enc.checksums() == dec.checksums()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitwise_identical_every_dtype(dtype):
    seq = [x.to(dtype) for x in ar1_sequence(steps=12, n=17, c=13)]
    cfg = cf.CompressionConfig(codec="int2", residual_order=2, warmup_steps=2)
    enc, dec, errors = run_pair(cfg, seq)
    assert all(e < 0.5 for e in errors)
    assert next(iter(enc.streams.values())).base.dtype == dtype


def test_error_feedback_bounded_without_it_grows_and_naive_is_worst():
    seq = ar1_sequence(steps=30)
    _, _, ef = run_pair(cf.CompressionConfig(codec="binary", residual_order=1, error_feedback=True), seq)
    _, _, no_ef = run_pair(cf.CompressionConfig(codec="binary", residual_order=1, error_feedback=False), seq)
    _, _, naive = run_pair(cf.CompressionConfig(codec="binary", residual_order=0, error_feedback=False), seq)
    late = slice(20, 30)
    mean = lambda v: sum(v[late]) / len(v[late])
    # with EF the error stays at the level of a single step's coding error ...
    assert max(ef[5:]) < 2.5 * max(ef[1:5])
    # ... without it the residual's coding errors accumulate
    assert mean(no_ef) > 1.5 * mean(ef)
    assert no_ef[-1] > no_ef[2]
    # coding the raw activation is the worst
    assert mean(naive) > mean(ef) and mean(naive) > mean(no_ef) * 0.9


def test_order2_beats_order1_on_smooth_trajectory_and_falls_back_with_one_warmup():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g)
    seq = [a + 0.1 * t * b + 0.005 * torch.randn(40, 24, generator=g) for t in range(20)]
    _, _, o1 = run_pair(cf.CompressionConfig(codec="int2", residual_order=1, warmup_steps=1), seq)
    _, _, o2 = run_pair(cf.CompressionConfig(codec="int2", residual_order=2, warmup_steps=1, delta_decay=1.0), seq)
    assert sum(o2[5:]) < sum(o1[5:])
    # step 1 has no delta yet: order 2 equals order 1 there
    assert o2[1] == pytest.approx(o1[1])


def test_warmup_is_lossless_and_bytes_follow_the_plan():
    seq = ar1_sequence(steps=6, n=16, c=24)
    cfg = cf.CompressionConfig(codec="binary", warmup_steps=2)
    enc, dec = ResidualEncoder(cfg), ResidualDecoder(cfg)
    for step, x in enumerate(seq):
        payload = enc.encode("s", x, step)
        x_hat = dec.decode("s", payload, step, x.shape, x.dtype)
        if step < 2:
            assert torch.equal(x_hat, x)
            assert payload.numel() == x.numel() * 4
        else:
            assert payload.numel() == get_codec("binary").encoded_nbytes(16, 24)
        assert payload.numel() == payload_nbytes(cfg, 0, step, x.shape, x.dtype)


def test_plan_callable_and_layer_plan():
    plan = layer_plan("binary", {0: "int8"})
    cfg = cf.CompressionConfig(codec="binary", warmup_steps=1, plan=plan)
    assert cfg.spec_for(0, 0) == "warmup"
    assert cfg.spec_for(0, 3) == "int8" and cfg.spec_for(5, 3) == "binary"
    enc = ResidualEncoder(cfg)
    x = torch.randn(8, 16)
    enc.encode((0, "k", 0), x, 0)
    assert enc.encode((0, "k", 0), x, 1).numel() == get_codec("int8").encoded_nbytes(8, 16)
    bad = cf.CompressionConfig(codec="binary", plan=lambda layer, step: "bogus")
    with pytest.raises(ValueError, match="plan"):
        bad.spec_for(0, 5)


def test_state_reset_and_memory():
    cfg = cf.CompressionConfig(codec="binary", residual_order=2)
    enc = ResidualEncoder(cfg)
    for step, x in enumerate(ar1_sequence(steps=3, n=10, c=8)):
        enc.encode("a", x, step)
    assert enc.state_nbytes() == 2 * 10 * 8 * 4
    with pytest.raises(ValueError, match="reset"):
        enc.encode("a", torch.randn(10, 8), 0)
    enc.reset()
    assert enc.state_nbytes() == 0
    enc.encode("a", torch.randn(10, 8), 0)


def test_state_dtype_halves_memory_and_stays_consistent():
    cfg = cf.CompressionConfig(codec="int4", state_dtype="bfloat16")
    enc, dec, errors = run_pair(cfg, ar1_sequence(steps=10, n=12, c=16))
    assert enc.state_nbytes() == 12 * 16 * 2
    assert max(errors) < 0.2


def test_nonfinite_never_reaches_the_cache():
    seq = ar1_sequence(steps=6, n=8, c=8)
    seq[3] = seq[3].clone()
    seq[3][0, 0] = float("nan")
    seq[3][1, 1] = float("inf")
    enc, dec, _ = run_pair(cf.CompressionConfig(codec="binary"), seq)
    for coder in (enc, dec):
        for st in coder.streams.values():
            assert torch.isfinite(st.base).all()
    assert enc.nonfinite_events() == 1
    strict = ResidualEncoder(cf.CompressionConfig(codec="binary", on_nonfinite="raise"))
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        strict.encode("s", seq[3], 0)


def test_all_zero_and_constant_streams_stay_exact_zero_error():
    cfg = cf.CompressionConfig(codec="binary", warmup_steps=0)
    enc, dec, _ = run_pair(cfg, [torch.zeros(5, 9)] * 4)
    assert all(torch.equal(st.base, torch.zeros(5, 9)) for st in dec.streams.values())
    enc, dec, errors = run_pair(cfg, [torch.full((5, 9), 3.0)] * 4)
    assert errors[-1] < 1e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(codec="nope"), "codec"),
    (dict(codec=3), "codec"),
    (dict(residual_order=3), "residual_order"),
    (dict(residual_order=2, error_feedback=False), "error_feedback"),
    (dict(residual_order=0, error_feedback=True), "error_feedback"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(delta_decay=1.5), "delta_decay"),
    (dict(tensors=("x",)), "tensors"),
    (dict(state_dtype="int8"), "state_dtype"),
    (dict(on_nonfinite="ignore"), "on_nonfinite"),
    (dict(plan="binary"), "plan"),
])
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cf.CompressionConfig(**kwargs)


def test_decoder_rejects_wrong_payload_size_and_bad_inputs():
    cfg = cf.CompressionConfig(codec="binary", warmup_steps=0)
    dec = ResidualDecoder(cfg)
    with pytest.raises(ValueError, match="disagree"):
        dec.decode("s", torch.zeros(3, dtype=torch.uint8), 0, (4, 8), torch.float32)
    enc = ResidualEncoder(cfg)
    with pytest.raises(ValueError, match="2-D"):
        enc.encode("s", torch.randn(2, 3, 4), 0)
    with pytest.raises(ValueError, match="empty"):
        enc.encode("s", torch.randn(0, 4), 0)
    with pytest.raises(TypeError):
        enc.encode("s", torch.ones(2, 2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="step"):
        enc.encode("s", torch.randn(2, 2), -1)
