"""Compressed warmup (``warmup_codec``) and closed-loop order-2 decay (``delta_decay="auto"``):
sender/receiver bitwise agreement, exact byte counts, NaN policy, validation."""
import pytest
import torch

from compactfusion.codecs import get_codec
from compactfusion.residual import CompressionConfig, NonFiniteError, ResidualDecoder, ResidualEncoder, payload_nbytes
from compactfusion.residual.coder import auto_gamma


def smooth_sequence(steps=12, n=24, c=40, seed=0, noise=0.02):
    g = torch.Generator().manual_seed(seed)
    a, b, q = (torch.randn(n, c, generator=g) for _ in range(3))
    return [a * 4 + 0.3 * t * b + 0.02 * t * t * q + noise * torch.randn(n, c, generator=g) for t in range(steps)]


def run_pair(cfg, seq, key=(0, "k", 1)):
    enc, dec = ResidualEncoder(cfg), ResidualDecoder(cfg)
    errs, sizes = [], []
    for t, x in enumerate(seq):
        payload, x_sender = enc.encode_with_reconstruction(key, x, t)
        x_hat = dec.decode(key, payload, t, tuple(x.shape), x.dtype)
        if cfg.error_feedback or cfg.residual_order == 0:  # the no-EF ablation diverges on purpose
            assert torch.equal(x_hat, x_sender), f"sender/receiver differ at step {t}"
        assert payload.numel() == payload_nbytes(cfg, 0, t, tuple(x.shape), x.dtype)
        sizes.append(payload.numel())
        errs.append(float((x_hat - x).norm() / x.norm()))
    if cfg.error_feedback:
        assert enc.checksums() == dec.checksums()
    return enc, dec, errs, sizes


@pytest.mark.parametrize("warm", ["int8", "int4"])
@pytest.mark.parametrize("order, warmup_steps", [(1, 1), (2, 2), (0, 1)])
def test_lossy_warmup_bitwise_and_exact_bytes(warm, order, warmup_steps):
    cfg = CompressionConfig(codec="binary", warmup_codec=warm, residual_order=order, error_feedback=order > 0,
                            warmup_steps=warmup_steps)
    seq = smooth_sequence()
    enc, dec, errs, sizes = run_pair(cfg, seq)
    n, c = seq[0].shape
    assert sizes[:warmup_steps] == [get_codec(warm).encoded_nbytes(n, c)] * warmup_steps
    assert sizes[warmup_steps:] == [get_codec("binary").encoded_nbytes(n, c)] * (len(seq) - warmup_steps)
    assert 0 < errs[0] < (0.02 if warm == "int8" else 0.2)  # lossy, at the warmup codec's precision


def test_lossy_warmup_error_is_fed_back_not_kept():
    """Step 0's int4 error must not persist: by a few steps the error matches the lossless-warmup run."""
    seq = smooth_sequence(steps=10, noise=0.0)
    lossless = run_pair(CompressionConfig(codec="int8", warmup_steps=1), seq)[2]
    lossy = run_pair(CompressionConfig(codec="int8", warmup_steps=1, warmup_codec="int4"), seq)[2]
    assert lossy[0] > 50 * max(lossless[0], 1e-9)
    assert lossy[-1] < 2 * lossless[-1] + 1e-4
    # without error feedback the int4 warmup error stays in the base: clearly worse than with it
    no_ef = run_pair(CompressionConfig(codec="int8", warmup_steps=1, warmup_codec="int4", error_feedback=False),
                     seq)[2]
    assert no_ef[-1] > 5 * lossy[-1]


def test_lossy_warmup_ledger_marks_warmup_steps():
    cfg = CompressionConfig(codec="binary", warmup_steps=2, warmup_codec="int8")
    assert cfg.spec_for(0, 1) == "warmup" and cfg.wire_spec("warmup", torch.float32) == "int8"
    assert CompressionConfig().wire_spec("warmup", torch.bfloat16) == "raw:bfloat16"
    assert payload_nbytes(cfg, 3, 0, (10, 16), torch.float16) == 10 * 16 + 4 * 16


def test_lossy_warmup_nan_policy_at_step_zero():
    x = torch.randn(8, 16)
    x[1, 2], x[3, 4] = float("nan"), float("inf")
    cfg = CompressionConfig(codec="binary", warmup_codec="int8")
    enc, dec = ResidualEncoder(cfg), ResidualDecoder(cfg)
    payload, x_sender = enc.encode_with_reconstruction("s", x, 0)
    x_hat = dec.decode("s", payload, 0, (8, 16), torch.float32)
    assert torch.equal(x_hat, x_sender) and torch.isfinite(x_hat).all()
    assert abs(float(x_hat[1, 2])) < 0.05  # replaced by the (zero) prediction before coding
    assert enc.nonfinite_events() == 1 and torch.isfinite(enc.streams["s"].base).all()
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        ResidualEncoder(CompressionConfig(codec="binary", warmup_codec="int8", on_nonfinite="raise")).encode("s", x, 0)


def test_auto_gamma_bitwise_and_beats_fixed_decay_on_smooth_trajectory():
    seq = smooth_sequence(steps=16, noise=0.005)
    enc, dec, auto, _ = run_pair(CompressionConfig(codec="binary", residual_order=2, warmup_steps=2,
                                                   delta_decay="auto"), seq)
    _, _, fixed, _ = run_pair(CompressionConfig(codec="binary", residual_order=2, warmup_steps=2), seq)
    st_e, st_d = next(iter(enc.streams.values())), next(iter(dec.streams.values()))
    assert st_e.gamma == st_d.gamma and 0.5 < st_e.gamma <= 1.0
    assert sum(auto[6:]) < sum(fixed[6:])


def test_auto_gamma_estimate_and_guards():
    p = torch.randn(6, 5)
    assert auto_gamma(0.75 * p, p) == 0.75
    assert auto_gamma(-p, p) == 0.0 and auto_gamma(3 * p, p) == 1.0
    assert auto_gamma(p, torch.zeros(6, 5)) == 0.0
    assert auto_gamma(p.half(), p.half()) == 1.0


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(warmup_codec="bogus"), ValueError, "warmup_codec"),
    (dict(warmup_codec="warmup"), ValueError, "warmup_codec"),
    (dict(warmup_codec=8), TypeError, "warmup_codec"),
    (dict(delta_decay="fast"), ValueError, "delta_decay"),
])
def test_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CompressionConfig(**kwargs)


def test_fingerprint_and_dict():
    base = CompressionConfig()
    assert base.fingerprint() == CompressionConfig(warmup_codec=None).fingerprint()
    assert base.fingerprint() != CompressionConfig(warmup_codec="int8").fingerprint()
    assert CompressionConfig(warmup_codec="int4").to_dict()["warmup_codec"] == "int4"
