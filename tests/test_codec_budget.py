"""``lowrank-int4-bpe:B``: rank from the bit budget, exact bytes, sender/receiver agreement, NaN policy."""
import pytest
import torch

from compactfusion.codecs import get_codec
from compactfusion.codecs.budget import budget_rank
from compactfusion.residual import CompressionConfig, NonFiniteError, ResidualDecoder, ResidualEncoder, payload_nbytes


@pytest.mark.parametrize("shape", [(512, 64), (128, 128), (37, 20), (1, 9)])
@pytest.mark.parametrize("bits", ["1.0", "1.1", "0.5", "3"])
def test_bytes_fit_the_budget_and_equal_fixed_rank_format(shape, bits):
    n, c = shape
    codec = get_codec(f"lowrank-int4-bpe:{bits}")
    r = budget_rank(float(bits), n, c, 1024)
    assert codec.effective_rank(n, c) == r
    nbytes = codec.encoded_nbytes(n, c)
    assert nbytes == get_codec(f"lowrank-int4:{r}").encoded_nbytes(n, c)
    if r > 1:  # rank 1 is the floor even when it exceeds a tiny budget
        assert nbytes <= float(bits) * n * c / 8 < get_codec(f"lowrank-int4:{r + 1}").encoded_nbytes(n, c) or r == min(n, c)
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(n + c))
    payload = codec.encode(x)
    assert payload.numel() == nbytes
    # identical bytes and decode to the fixed-rank codec of the same rank (same wire format)
    fixed = get_codec(f"lowrank-int4:{r}")
    assert torch.equal(payload, fixed.encode(x))
    assert torch.equal(codec.decode(payload, (n, c)), fixed.decode(payload, (n, c)))


def test_rank_at_the_bench_shape():
    assert get_codec("lowrank-int4-bpe:1.1").effective_rank(4096, 128) == 34
    assert get_codec("lowrank-int4-bpe:1.0").effective_rank(4096, 128) == 30


def test_residual_pair_bitwise_and_payload_nbytes():
    g = torch.Generator().manual_seed(3)
    base, drift = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    cfg = CompressionConfig(codec="lowrank-int4-bpe:1.0", residual_order=2, warmup_steps=1, delta_decay="auto",
                            warmup_codec="int8")
    enc, dec = ResidualEncoder(cfg), ResidualDecoder(cfg)
    for t in range(8):
        x = base + 0.1 * t * drift + 0.01 * torch.randn(64, 32, generator=g)
        payload, x_sender = enc.encode_with_reconstruction("s", x, t)
        assert payload.numel() == payload_nbytes(cfg, 0, t, (64, 32), torch.float32)
        assert torch.equal(dec.decode("s", payload, t, (64, 32), torch.float32), x_sender)
    assert enc.checksums() == dec.checksums()


def test_nan_policy():
    x = torch.randn(16, 8)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        get_codec("lowrank-int4-bpe:1.0").encode(x)
    enc = ResidualEncoder(CompressionConfig(codec="lowrank-int4-bpe:1.0", warmup_steps=0))
    assert torch.isfinite(enc.encode_with_reconstruction("s", x, 0)[1]).all() and enc.nonfinite_events() == 1
    with pytest.raises(NonFiniteError):
        ResidualEncoder(CompressionConfig(codec="lowrank-int4-bpe:1.0", on_nonfinite="raise")).encode("s", x, 0)


@pytest.mark.parametrize("spec", ["lowrank-int4-bpe:0", "lowrank-int4-bpe:-1", "lowrank-int4-bpe:17",
                                  "lowrank-int4-bpe:1e3", "lowrank-int4-bpe:", "lowrank-int4-bpe:01.0"])
def test_bad_specs(spec):
    with pytest.raises(ValueError, match="lowrank-int4-bpe"):
        get_codec(spec)
    with pytest.raises(ValueError, match="codec"):
        CompressionConfig(codec=spec)
