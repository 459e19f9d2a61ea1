"""Fused implementations of the ``binary`` and ``int2`` codecs (same bytes, same reconstruction).

The PyTorch code in sign.py is the reference; these paths must reproduce it bit for bit
(tests/test_fused*.py). Selection, per codec instance (``get_codec(spec, impl=...)``):

* ``"auto"`` (default): the fused path where one exists for the tensor's device — C kernels on
  CPU (cpu.py, built on first use), Triton kernels on CUDA when triton is installed
  (triton_kernels.py) — else the reference. The environment variable ``COMPACTFUSION_CODEC_IMPL``
  (auto/reference/fused) overrides ``"auto"`` for a whole run, e.g. to benchmark the reference.
* ``"reference"``: always the PyTorch path.
* ``"fused"``: the fused path for the device; RuntimeError where none is available.
* ``"triton"``: the Triton kernels on any device; on CPU tensors they run in Triton's
  interpreter (slow; for tests). RuntimeError without triton.

Inputs with NaN/Inf (or whose |x| sums overflow fp32) always go through the reference, so the
error messages and the overflow handling stay in one place.
"""
from __future__ import annotations

import os
import warnings

import torch

from ..numeric import row_blocks
from . import cpu

IMPLS = ("auto", "reference", "fused", "triton")
IMPL_ENV = "COMPACTFUSION_CODEC_IMPL"


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"codec impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    return impl


def _effective(impl: str) -> str:
    if impl != "auto":
        return impl
    env = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
    if env not in ("auto", "reference", "fused"):
        raise ValueError(f"{IMPL_ENV} must be auto, reference or fused; got {env!r}")
    return env


def _cpu_lib():
    return cpu.load()


def _triton():
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels if triton_kernels.available() else None


def backend(impl: str, device: torch.device) -> str:
    """Which implementation ``impl`` resolves to on ``device``: "cpu-c", "triton" or "reference"."""
    impl = _effective(check_impl(impl))
    if impl == "reference":
        return "reference"
    if impl == "triton":
        if _triton() is None:
            raise RuntimeError("codec impl 'triton' needs the triton package (pip install 'compactfusion[gpu]')")
        return "triton"
    if device.type == "cpu" and _cpu_lib() is not None:
        return "cpu-c"
    if device.type == "cuda" and _triton() is not None:
        return "triton"
    if impl == "fused":
        raise RuntimeError(
            f"no fused codec kernels for device {device}: CPU needs a working C compiler (cc/gcc/clang), "
            "CUDA needs triton; use impl='auto' to fall back to the PyTorch reference"
        )
    return "reference"


def encode(impl: str, codec, x: torch.Tensor, bits: int, sub: torch.Tensor | None = None) -> torch.Tensor | None:
    """The payload of x (or of x.float() - sub), or None where the reference must encode (no fused
    path, NaN/Inf, overflow)."""
    kind = backend(impl, x.device)
    if kind == "reference":
        return None
    if kind == "cpu-c":
        return cpu.encode(_cpu_lib(), codec, x, bits, None, sub)  # blocks computed there when needed
    if sub is not None:
        x = x.float() - sub
    try:
        return _triton().encode(codec, x, bits, row_blocks(*x.shape, x.device))
    except (ValueError, TypeError):  # the input's fault (NaN/Inf ...): same error as the reference
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a GPU this triton cannot compile for
        return _triton_failed(impl, e)


def decode(impl: str, payload: torch.Tensor, n: int, c: int, bits: int, levels, dtype,
           add_to: torch.Tensor | None = None) -> torch.Tensor | None:
    kind = backend(impl, payload.device)
    if kind == "reference":
        return None
    if kind == "cpu-c":
        return cpu.decode(_cpu_lib(), payload, n, c, bits, levels, dtype, add_to)
    try:
        out = _triton().decode(payload, n, c, bits, levels, dtype)
    except Exception as e:  # noqa: BLE001
        return _triton_failed(impl, e)
    return out if add_to is None else add_to + out


def _triton_failed(impl: str, err: Exception) -> None:
    """Under "auto" a Triton failure (compiler, driver, unsupported GPU) falls back to the reference."""
    if _effective(impl) != "auto":
        raise err
    warnings.warn(f"compactfusion codecs: Triton kernels failed ({type(err).__name__}: {err}); "
                  "using the PyTorch reference", RuntimeWarning, stacklevel=3)
    return None
