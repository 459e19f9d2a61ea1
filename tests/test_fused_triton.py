"""Triton codec kernels against the PyTorch reference, on CPU through Triton's interpreter.

The interpreter must be switched on before triton is first imported, so the checks run in one
child process started with TRITON_INTERPRET=1 (tiny shapes: the interpreter runs every program
instance in Python). Skipped where triton is not installed (it is the optional `gpu` extra; on a
CUDA machine the same kernels are compiled and checked by the CUDA test below).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SPECS = ("binary", "int2")
SHAPES = ((1, 1), (1, 9), (3, 7), (4, 8), (5, 17), (2, 300), (12, 33))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _bits(y: torch.Tensor) -> torch.Tensor:
    return y.view(torch.int32 if y.element_size() == 4 else torch.int16)


def check_same(spec: str, x: torch.Tensor, impl: str = "triton", out_dtypes=DTYPES) -> None:
    from compactfusion.codecs import get_codec

    ref, tri = get_codec(spec, impl="reference"), get_codec(spec, impl=impl)
    want = ref.encode(x.cpu()).to(x.device)
    got = tri.encode(x)
    assert got.device == x.device and torch.equal(got, want), (spec, tuple(x.shape), x.dtype)
    for dt in out_dtypes:
        y = tri.decode(want, tuple(x.shape), dt)
        y_ref = ref.decode(want.cpu(), tuple(x.shape), dt)
        assert y.dtype == dt and torch.equal(_bits(y.cpu()), _bits(y_ref)), (spec, tuple(x.shape), dt)


def child_checks() -> int:
    """Runs in the TRITON_INTERPRET=1 child; returns the number of cases checked."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from compactfusion.codecs import get_codec

    count = 0
    for spec in SPECS:
        for i, shape in enumerate(SHAPES):
            g = torch.Generator().manual_seed(i)
            dtype = DTYPES[i % len(DTYPES)]
            check_same(spec, torch.randn(*shape, generator=g).to(dtype))
            count += 1
        check_same(spec, torch.zeros(3, 5))
        check_same(spec, torch.full((2, 6), -0.0))
        check_same(spec, torch.randn(9, 20)[:, 3:17])  # strided rows
        x = torch.randn(3, 4)
        x[1, 1] = float("nan")
        try:
            get_codec(spec, impl="triton").encode(x)
            raise AssertionError("NaN input was accepted")
        except ValueError as e:
            assert "NaN" in str(e)
        count += 4

    @settings(max_examples=12, deadline=None, database=None)
    @given(spec=st.sampled_from(SPECS), n=st.integers(1, 6), c=st.integers(1, 40),
           dtype=st.sampled_from(DTYPES), exp=st.integers(-8, 4), seed=st.integers(0, 2**16))
    def prop(spec, n, c, dtype, exp, seed):
        g = torch.Generator().manual_seed(seed)
        check_same(spec, (torch.randn(n, c, generator=g) * 10.0**exp).to(dtype), out_dtypes=(torch.float32,))

    prop()
    return count + 12


def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "checked" in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cuda_matches_reference():
    pytest.importorskip("triton")
    from compactfusion.codecs import fused, get_codec

    assert fused.backend("auto", torch.device("cuda")) == "triton"
    for spec in SPECS:
        for shape in SHAPES + ((1088, 3072), (333, 1001)):
            g = torch.Generator().manual_seed(shape[0])
            for dtype in DTYPES:
                # Same device type for sender and receiver: the encode reference is torch on CUDA.
                x = torch.randn(*shape, generator=g).to(dtype).cuda()
                want = get_codec(spec, impl="reference").encode(x)
                got = get_codec(spec, impl="triton").encode(x)
                assert torch.equal(got, want), (spec, shape, dtype)
                for dt in DTYPES:
                    y = get_codec(spec, impl="triton").decode(want, shape, dt).cpu()
                    y_ref = get_codec(spec, impl="reference").decode(want.cpu(), shape, dt)
                    assert torch.equal(_bits(y), _bits(y_ref)), (spec, shape, dtype, dt)


if __name__ == "__main__":
    print(f"checked {child_checks()} cases")
