"""integrations/diffusers/guards.py: generator fingerprints, tensor digests, finiteness, cross-rank agreement."""
import numpy as np
import pytest
import torch

from distributed import run_distributed
from compactfusion.integrations.diffusers.guards import (NonFiniteOutputError, RankDivergenceError, check_finite,
                                                         check_ranks_agree, generator_fingerprint, tensor_digest)


def test_generator_fingerprint_is_the_full_state():
    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert generator_fingerprint(a) == generator_fingerprint(b)
    torch.randn(3, generator=b)  # same seed, advanced: initial_seed() agrees, the state does not
    assert a.initial_seed() == b.initial_seed() and generator_fingerprint(a) != generator_fingerprint(b)
    assert generator_fingerprint(torch.Generator().manual_seed(1)) != generator_fingerprint(a)
    assert generator_fingerprint(None) == "none" != generator_fingerprint(a)
    fresh = [torch.Generator().manual_seed(s) for s in (0, 1)]
    assert generator_fingerprint(fresh) == generator_fingerprint([torch.Generator().manual_seed(s) for s in (0, 1)])
    assert generator_fingerprint(fresh) != generator_fingerprint(fresh[::-1])
    with pytest.raises(TypeError, match="Generator"):
        generator_fingerprint(0)


def test_tensor_digest_equal_iff_bitwise_equal():
    x = torch.randn(2, 256, 64, generator=torch.Generator().manual_seed(0))
    assert tensor_digest(x) == tensor_digest(x.clone()) == tensor_digest(x.numpy())
    assert tensor_digest(x) == tensor_digest(x.transpose(0, 2).contiguous().transpose(0, 2))  # layout does not matter
    y = x.clone()
    y.view(-1)[12345] = torch.nextafter(y.view(-1)[12345], torch.tensor(10.0))  # one ulp, one element
    assert tensor_digest(y) != tensor_digest(x)
    z = x.clone().view(-1)
    z[[3, 7]] = z[[7, 3]]  # two elements swapped: same sum, different positions
    assert tensor_digest(z.view_as(x)) != tensor_digest(x)
    assert tensor_digest(x) != tensor_digest(x.reshape(512, 64))  # shape is part of it
    assert tensor_digest(x) != tensor_digest(x.double())
    assert tensor_digest(torch.zeros(0)) == tensor_digest(torch.zeros(0))
    nan = torch.full((4,), float("nan"))
    assert tensor_digest(nan) == tensor_digest(nan.clone())
    assert tensor_digest(torch.tensor([True, False])) != tensor_digest(torch.tensor([False, True]))
    assert tensor_digest(x.to(torch.bfloat16)) == tensor_digest(x.to(torch.bfloat16))


def test_check_finite_names_where():
    check_finite(np.zeros((2, 3)), "anywhere")
    check_finite([torch.ones(2), np.ones(3), {"a": torch.arange(3)}], "anywhere")
    for bad in (np.array([0.0, np.nan]), torch.tensor([1.0, float("inf")]), [np.zeros(2), torch.tensor([float("-inf")])]):
        with pytest.raises(NonFiniteOutputError, match="rank 1, step 3") as info:
            check_finite(bad, "rank 1, step 3")
        assert isinstance(info.value, ValueError) and info.value.where == "rank 1, step 3" and info.value.count == 1

    class Out:  # a pipeline output
        images = np.array([[np.nan, 0.0]])
    with pytest.raises(NonFiniteOutputError, match="1 of 2"):
        check_finite(Out(), "the images")


def test_check_ranks_agree_single_process():
    assert check_ranks_agree(lambda d: [d, d, d], "ab", "latents", 2) == ["ab"] * 3
    with pytest.raises(RankDivergenceError, match=r"ranks \[2\] differ from rank 0 in latents at step 4") as info:
        check_ranks_agree(lambda d: [d, d, "zz"], "ab", "latents", 4)
    assert info.value.ranks == [2] and info.value.step == 4 and info.value.what == "latents"


def _agree_two_ranks(rank, world):
    import torch.distributed as dist

    def gather(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    x = torch.arange(12.0)
    res = {"same": check_ranks_agree(gather, tensor_digest(x), "latents", 0)}
    if rank == 1:
        x[5] += 1e-3  # one rank edits its latents (a callback, say)
    try:
        check_ranks_agree(gather, tensor_digest(x), "latents", 3)
        res["diverged"] = None
    except RankDivergenceError as e:
        res["diverged"] = (e.ranks, e.step, str(e))
    gen = torch.Generator().manual_seed(0)
    if rank == 1:
        torch.randn(1, generator=gen)
    try:
        check_ranks_agree(gather, generator_fingerprint(gen), "the generator state")
        res["generator"] = None
    except RankDivergenceError as e:
        res["generator"] = (e.ranks, str(e))
    return res


@pytest.mark.dist
def test_check_ranks_agree_two_ranks():
    for rank, r in enumerate(run_distributed(_agree_two_ranks, 2, timeout=120)):
        assert len(set(r["same"])) == 1
        assert r["diverged"] is not None and r["diverged"][:2] == ([1], 3), (rank, r)  # raised on every rank
        assert r["generator"] is not None and r["generator"][0] == [1] and "generator state" in r["generator"][1]
