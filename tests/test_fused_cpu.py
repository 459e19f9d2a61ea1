"""Fused CPU codecs (C kernels) against the PyTorch reference: same bytes, same reconstruction bits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compactfusion.codecs import fused, get_codec
from compactfusion.codecs.fused import cpu
from compactfusion.codecs.numeric import row_blocks

SPECS = ("binary", "int2")
BITS = {"binary": 1, "int2": 2}
IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.fixture(scope="module", params=["simd", "portable"])
def lib(request):
    lib = cpu.load(portable=request.param == "portable")
    if lib is None:
        pytest.skip("no working C compiler: the fused CPU path is disabled (reference used)")
    if request.param == "simd" and not lib.cf_simd():
        pytest.skip("this CPU/compiler has no AVX2+F16C build")
    return lib


def _bits(y: torch.Tensor) -> torch.Tensor:
    return y.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[y.element_size()])


def check_same(lib, spec: str, x: torch.Tensor, out_dtypes=OUT_DTYPES) -> None:
    ref = get_codec(spec, impl="reference")
    n, c = x.shape
    want = ref.encode(x)
    got = cpu.encode(lib, ref, x, BITS[spec], row_blocks(n, c, x.device))
    assert got is not None and got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want), (spec, x.shape, x.dtype, (got != want).nonzero().flatten()[:8])
    levels = (-1.0, 1.0) if spec == "binary" else (-0.46875, -1.875, 0.46875, 1.875)
    for dt in out_dtypes:
        y_ref = ref.decode(want, (n, c), dt)
        y = cpu.decode(lib, want, n, c, BITS[spec], levels, dt)
        assert y.dtype == y_ref.dtype == dt and y.shape == (n, c)
        assert torch.equal(_bits(y), _bits(y_ref)), (spec, x.shape, dt)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", ((1, 1), (1, 9), (3, 7), (4, 8), (5, 17), (16, 3), (33, 130), (64, 128)))
@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_small_shapes_match_reference(lib, spec, shape, dtype):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    check_same(lib, spec, torch.randn(*shape, generator=g).to(dtype))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", ((700, 3001), (1088, 3072)))
def test_multi_block_shapes_match_reference(lib, spec, shape):
    """Shapes over CPU_BLOCK_ELEMS: the column sums are accumulated block by block."""
    assert len(row_blocks(*shape, "cpu")) > 1
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        check_same(lib, spec, torch.randn(*shape, generator=g), out_dtypes=(torch.float32, torch.float16))
    check_same(lib, spec, torch.randn(*shape, generator=g).to(torch.bfloat16), out_dtypes=(torch.bfloat16,))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    spec=st.sampled_from(SPECS),
    n=st.integers(1, 40),
    c=st.integers(1, 70),
    dtype=st.sampled_from(IN_DTYPES),
    exp=st.integers(-9, 5),
    zero_frac=st.sampled_from((0.0, 0.0, 0.3, 0.9, 1.0)),
    neg_zero=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(lib, spec, n, c, dtype, exp, zero_frac, neg_zero, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * 10.0**exp
    x = x * (torch.rand(n, c, generator=g) >= zero_frac)
    if neg_zero:  # -0.0 counts as non-negative (bit 1), like x >= 0 in the reference
        x = torch.where(x == 0, torch.tensor(-0.0), x)
    x = x.to(dtype)
    if not torch.isfinite(x).all():  # 1e5 overflows fp16: both paths refuse it
        for impl in ("reference", "auto"):
            with pytest.raises(ValueError, match="Inf"):
                get_codec(spec, impl=impl).encode(x)
        return
    check_same(lib, spec, x)


@pytest.mark.parametrize("spec", SPECS)
def test_constant_rows_columns_and_ties(lib, spec):
    check_same(lib, spec, torch.full((9, 21), 0.75))
    check_same(lib, spec, torch.arange(12.0).repeat(5, 1))
    check_same(lib, spec, torch.arange(12.0)[:, None].repeat(1, 5))
    check_same(lib, spec, torch.zeros(6, 10))
    # fp16 factor ties (round half to even) show up in many-valued dyadic inputs
    check_same(lib, spec, (torch.arange(-64, 64).float() / 64).view(8, 16))


@pytest.mark.parametrize("spec", SPECS)
def test_non_contiguous_and_offset_inputs(lib, spec):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 70, generator=g)
    for x in (base.t(), base[3:, 5:], base[:, ::2], base[1:, :-1].to(torch.float16)):
        check_same(lib, spec, x, out_dtypes=(torch.float32,))


@pytest.mark.parametrize("spec", SPECS)
def test_codec_default_uses_fused_and_is_identical(spec, lib):
    if fused.backend("auto", torch.device("cpu")) != "cpu-c":
        pytest.skip("auto does not select the C kernels here")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 90, generator=g)
    auto, ref = get_codec(spec), get_codec(spec, impl="reference")
    p = auto.encode(x)
    assert torch.equal(p, ref.encode(x))
    assert torch.equal(_bits(auto.decode(p, x.shape)), _bits(ref.decode(p, x.shape)))
    # a receiver slicing its payload out of a larger buffer at an odd offset decodes the same bits
    big = torch.cat([torch.tensor([7], dtype=torch.uint8), p])
    assert torch.equal(_bits(auto.decode(big[1:], x.shape)), _bits(ref.decode(p, x.shape)))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad,word", ((float("nan"), "NaN"), (float("inf"), "Inf")))
def test_nonfinite_policy_unchanged(spec, bad, word):
    x = torch.randn(6, 9)
    x[2, 3] = bad
    for impl in ("auto", "reference"):
        with pytest.raises(ValueError, match=word):
            get_codec(spec, impl=impl).encode(x)


@pytest.mark.parametrize("spec", SPECS)
def test_huge_finite_input_falls_back_identically(spec):
    x = torch.full((4, 6), 3e38)
    x[0, 0] = -3e38
    p = get_codec(spec).encode(x)
    assert torch.equal(p, get_codec(spec, impl="reference").encode(x))
    assert torch.isfinite(get_codec(spec).decode(p, x.shape)).all()


def test_impl_validation_and_env_override(monkeypatch):
    with pytest.raises(ValueError, match="impl"):
        get_codec("binary", impl="fast")
    with pytest.raises(ValueError, match="impl"):
        get_codec("int8", impl="fast")
    monkeypatch.setenv(fused.IMPL_ENV, "reference")
    assert fused.backend("auto", torch.device("cpu")) == "reference"
    assert fused.backend("fused", torch.device("cpu")) != "reference" or cpu.load() is None
    monkeypatch.setenv(fused.IMPL_ENV, "bogus")
    with pytest.raises(ValueError, match=fused.IMPL_ENV):
        get_codec("binary").encode(torch.ones(2, 2))


def test_no_compiler_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    cpu.load.cache_clear()
    try:
        assert cpu.load() is None
        assert fused.backend("auto", torch.device("cpu")) == "reference"
        with pytest.raises(RuntimeError, match="C compiler"):
            get_codec("binary", impl="fused").encode(torch.ones(3, 3))
        x = torch.randn(5, 11)
        assert torch.equal(get_codec("int2").encode(x), get_codec("int2", impl="reference").encode(x))
    finally:
        cpu.load.cache_clear()


def test_build_cache_is_reused(tmp_path, monkeypatch):
    if cpu._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv(cpu.CACHE_ENV, str(tmp_path))
    cpu.load.cache_clear()
    try:
        assert cpu.load() is not None
        built = list(tmp_path.glob("cf_sign_*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))
        stamp = built[0].stat().st_mtime_ns
        cpu.load.cache_clear()
        assert cpu.load() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        cpu.load.cache_clear()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("impl", ("auto", "reference"))
def test_decode_add_is_base_plus_decode_bitwise(spec, impl):
    """The fused residual update: base + D(payload) in one pass, same bits as the two-step form."""
    g = torch.Generator().manual_seed(6)
    codec = get_codec(spec, impl=impl)
    for n, c in ((1, 1), (7, 13), (64, 128), (700, 3001)):
        x = torch.randn(n, c, generator=g)
        base = torch.randn(n, c, generator=g) * 3
        p = codec.encode(x)
        want = base + get_codec(spec, impl="reference").decode(p, (n, c), torch.float32)
        for b in (base, torch.zeros(n, c), base.t().contiguous().t()):
            want_b = b + get_codec(spec, impl="reference").decode(p, (n, c), torch.float32)
            got = codec.decode_add(p, (n, c), b)
            assert got.dtype == torch.float32 and torch.equal(_bits(got), _bits(want_b))
        assert torch.equal(_bits(codec.decode_add(p, (n, c), base)), _bits(want))
    # other dtypes/shapes of base: plain broadcasting semantics of base + decode
    p = codec.encode(torch.randn(4, 6, generator=g))
    row = torch.randn(6, generator=g)
    assert torch.equal(codec.decode_add(p, (4, 6), row), row + codec.decode(p, (4, 6)))
    assert get_codec("int8").decode_add(get_codec("int8").encode(torch.ones(2, 3)), (2, 3), torch.ones(2, 3)).shape == (2, 3)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("impl", ("auto", "reference"))
def test_encode_residual_is_encode_of_difference(spec, impl):
    """The fused residual step: E(x.float() - pred) without materialising the residual, same bytes."""
    g = torch.Generator().manual_seed(7)
    codec, ref = get_codec(spec, impl=impl), get_codec(spec, impl="reference")
    for (n, c), dtype in (((1, 1), torch.float32), ((7, 13), torch.float16), ((64, 128), torch.bfloat16),
                          ((700, 3001), torch.float32), ((30, 50), torch.float64)):
        x = torch.randn(n, c, generator=g).to(dtype)
        pred = x.float() + 0.05 * torch.randn(n, c, generator=g)
        assert torch.equal(codec.encode_residual(x, pred), ref.encode(x.float() - pred)), (spec, n, c, dtype)
        assert torch.equal(codec.encode_residual(x, torch.zeros(n, c)), ref.encode(x.float()))
    x = torch.randn(5, 9, generator=g)
    assert torch.equal(codec.encode_residual(x.t(), torch.ones(9, 5)), ref.encode(x.t() - 1))
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        codec.encode_residual(x, torch.zeros(5, 9))
    with pytest.raises(ValueError, match="Inf"):
        codec.encode_residual(torch.full((2, 3), 3e38), torch.full((2, 3), -3e38))
    assert get_codec("int8").encode_residual(torch.ones(2, 3), torch.ones(2, 3)).numel() == 2 * 3 + 4 * 3


def test_build_without_openmp_still_works(tmp_path, monkeypatch):
    if cpu._compiler() is None:
        pytest.skip("no C compiler")
    real_build = cpu._build

    def no_openmp(cc, flags, out):
        if "-fopenmp" in flags:
            raise cpu.subprocess.CalledProcessError(1, [cc, "-fopenmp"])
        real_build(cc, flags, out)

    monkeypatch.setenv(cpu.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpu, "_build", no_openmp)
    cpu.load.cache_clear()
    try:
        lib = cpu.load()
        assert lib is not None
        check_same(lib, "int2", torch.randn(300, 301), out_dtypes=(torch.float32,))
    finally:
        cpu.load.cache_clear()


def test_triton_failure_falls_back_under_auto_only(monkeypatch):
    class Broken:
        @staticmethod
        def encode(*args):
            raise RuntimeError("no kernel for this GPU")

        decode = encode

    x = torch.randn(6, 10)
    want = get_codec("binary", impl="reference").encode(x)
    monkeypatch.setattr(fused, "backend", lambda impl, device: "reference" if impl == "reference" else "triton")
    monkeypatch.setattr(fused, "_triton", lambda: Broken)
    with pytest.warns(RuntimeWarning, match="Triton kernels failed"):
        assert torch.equal(get_codec("binary").encode(x), want)
    with pytest.warns(RuntimeWarning):
        assert torch.equal(get_codec("binary").decode(want, (6, 10)), get_codec("binary", impl="reference").decode(want, (6, 10)))
    with pytest.raises(RuntimeError, match="no kernel"):
        get_codec("binary", impl="triton").encode(x)


# ---- small-shape fast path: cached scratch, mean folded into the kernels -------------------------


def test_torch_mean_is_sum_then_one_division():
    """cf_sign_stats turns torch's sum(tok) into tok.mean() with one fp32 division by n: that is how
    CPU torch computes mean. A torch that changed it (e.g. to sum * (1/n)) fails here first."""
    g = torch.Generator().manual_seed(8)
    for n in (1, 3, 7, 64, 100, 136, 1000, 1088, 4097):
        for _ in range(20):
            t = torch.rand(n, generator=g) * 10.0 ** float(torch.randint(-30, 30, (1,), generator=g))
            want = t.mean()
            got = torch.from_numpy(t.sum().numpy().reshape(1) / np.float32(n))[0]
            assert torch.equal(_bits(want.reshape(1)), _bits(got.reshape(1))), (n, float(want), float(got))


@pytest.mark.parametrize("spec", SPECS)
def test_returned_tensors_never_alias_cached_scratch(spec, lib):
    """Scratch is reused per shape; every payload and reconstruction is fresh memory that the next
    call leaves alone."""
    g = torch.Generator().manual_seed(9)
    codec, ref = get_codec(spec), get_codec(spec, impl="reference")
    x1, x2 = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g) * 5
    p1 = cpu.encode(lib, codec, x1, BITS[spec])
    keep = p1.clone()
    p2 = cpu.encode(lib, codec, x2, BITS[spec])
    assert torch.equal(p1, keep) and torch.equal(p1, ref.encode(x1)) and torch.equal(p2, ref.encode(x2))
    scratch = codec.scratch.get(64, 128, 64)
    assert codec.scratch.get(64, 128, 64) is scratch  # cached, not rebuilt
    y1 = codec.decode(p1, (64, 128))
    y_keep = y1.clone()
    y2 = codec.decode(p2, (64, 128))
    assert torch.equal(y1, y_keep) and torch.equal(_bits(y1), _bits(ref.decode(p1, (64, 128))))
    lo, hi = scratch.mem.data_ptr(), scratch.mem.data_ptr() + scratch.mem.numel() * 4
    for t in (p1, p2, y1, y2):
        assert not lo <= t.data_ptr() < hi  # nothing returned lives in the scratch
    assert p1.data_ptr() != p2.data_ptr() and y1.data_ptr() != y2.data_ptr()


@pytest.mark.parametrize("spec", SPECS)
def test_scratch_reuse_across_shapes_inputs_and_fallbacks(spec):
    """Nothing a cached buffer held before changes the next encode: alternating shapes, dtypes,
    residual inputs, a NaN input and an overflowing one (both refused or re-encoded by the reference)."""
    g = torch.Generator().manual_seed(10)
    codec, ref = get_codec(spec), get_codec(spec, impl="reference")
    for i in range(3):
        for shape in ((64, 128), (5, 17), (64, 128), (1, 1)):
            x = torch.randn(*shape, generator=g) * 10.0 ** (i - 1)
            assert torch.equal(codec.encode(x), ref.encode(x)), (shape, i)
            assert torch.equal(codec.encode(x.half()), ref.encode(x.half()))
            pred = torch.randn(*shape, generator=g)
            assert torch.equal(codec.encode_residual(x, pred), ref.encode(x - pred))
        bad = torch.randn(64, 128, generator=g)
        bad[3, 4] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            codec.encode(bad)
        huge = torch.full((64, 128), 3e38)
        assert torch.equal(codec.encode(huge), ref.encode(huge))
    assert len(codec.scratch.by_shape) == 3  # one cached Scratch per shape


def test_scratch_is_per_thread_bounded_and_not_copied():
    import copy
    import pickle
    import threading

    codec = get_codec("int2")
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(64, 128, generator=g) for _ in range(4)]
    want = [get_codec("int2", impl="reference").encode(x) for x in xs]
    errors, seen = [], []

    def worker(k):
        try:
            for _ in range(30):
                if not torch.equal(codec.encode(xs[k]), want[k]):
                    errors.append(k)
            seen.append(codec.scratch.get(64, 128, 64))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({id(s) for s in seen}) == 4  # one buffer per thread, never shared
    for n in range(1, cpu.SCRATCH_CACHE_SHAPES + 5):
        codec.encode(torch.randn(n, 3, generator=g))
    assert len(codec.scratch.by_shape) <= cpu.SCRATCH_CACHE_SHAPES
    big = torch.randn(600, 200, generator=g)  # block over SCRATCH_CACHE_ELEMS: allocated per call, not kept
    assert 600 * 200 > cpu.SCRATCH_CACHE_ELEMS
    codec.scratch.by_shape.clear()
    assert torch.equal(codec.encode(big), get_codec("int2", impl="reference").encode(big))
    assert codec.scratch.by_shape == {}
    for clone in (copy.deepcopy(codec), pickle.loads(pickle.dumps(codec))):
        assert clone.scratch.by_shape == {} and torch.equal(clone.encode(xs[0]), want[0])


@pytest.mark.parametrize("spec", SPECS)
def test_scratch_made_in_inference_mode_works_outside_and_with_grad_inputs(spec):
    codec, ref = get_codec(spec), get_codec(spec, impl="reference")
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        assert torch.equal(codec.encode(x), ref.encode(x))
    assert torch.equal(codec.encode(x), ref.encode(x))
    y = x.clone().requires_grad_(True)
    assert torch.equal(codec.encode(y), ref.encode(x))
    with torch.inference_mode():
        assert torch.equal(codec.encode(x * 2), ref.encode(x * 2))
