"""Fused CPU path for ``binary``/``int2``: small C kernels built once with the system C compiler.

Why C through ctypes: measured on the 2-core CI box, torch.compile (inductor's C++ backend) costs
~140 us of dispatch per call at 64x128 and produced a 15 ms decode at 1088x3072 (the reference
takes ~5 ms); a 200-line C file with AVX2 intrinsics decodes that shape in well under 1 ms and
needs no new dependency. The build is cached on disk, keyed by the source, the compiler and the
flags, and loaded once per process; without a working compiler the codecs use the reference.

Byte equality with the reference: the two sums whose value depends on the summation order
(row/column sums of |x| and mean(tok)) are still computed by the same torch calls on the same
block shapes as sign.py; only |x| itself (exact), the sign/int2 fields and the elementwise scale
arithmetic move into C. The kernels share torch's OpenMP runtime (torch ships libgomp.so.1, so
the loader reuses it) and hence its thread count.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .csrc import SOURCE

#: Set to a directory to keep the built kernels elsewhere (default ~/.cache/compactfusion/kernels).
CACHE_ENV = "COMPACTFUSION_KERNEL_CACHE"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_VP, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "cf_abs_bits": (None, [_VP, _I32, _I64, _I64, _I64, _VP, _VP, _VP, _I64]),
    "cf_div_sums": (None, [_VP, _I64, _VP, _I64]),
    "cf_sign_stats": (_I32, [_VP, _I64, _VP, _I64, _F32, _VP]),
    "cf_sign_factors": (None, [_VP, _I64, _VP, _I64, _F32, _VP, _F32, _VP, _VP]),
    "cf_int2_fields": (_I32, [_VP, _I32, _I64, _I64, _I64, _VP, _VP, _VP, _VP, _I64]),
    "cf_sign_decode": (_I32, [_VP, _I64, _I64, _I32, _VP, _VP, _I32, _VP]),
    "cf_simd": (_I32, []),
}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    home = Path.home() / ".cache" / "compactfusion" / "kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(tempfile.gettempdir()) / "compactfusion-kernels"


def _flags(portable: bool) -> list[str]:
    base = ["-O3", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-fopenmp"]
    if portable:
        return base + ["-DCF_PORTABLE"]
    # Built where it runs, so -march=native is safe; x86-64 gets the AVX2/F16C paths.
    return base + (["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else [])


def _build(cc: str, flags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(f".{os.getpid()}.c")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    src.write_text(SOURCE, encoding="utf-8")
    try:
        subprocess.run([cc, *flags, str(src), "-o", str(tmp), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)  # atomic: concurrent ranks building the same file never see half of it
    finally:
        for p in (src, tmp):
            p.unlink(missing_ok=True)


@functools.cache
def load(portable: bool = False):
    """The loaded kernel library, or None where no C compiler works (then: reference path).

    Cached for the life of the process: the compile (about a second, once per machine) and the
    dlopen are never paid per call.
    """
    if sys.platform.startswith("win"):
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lib = None
    full = _flags(portable)
    # Without OpenMP (e.g. clang lacking libomp) the pragmas are ignored: single-threaded kernels.
    for flags in (full, [f for f in full if f != "-fopenmp"]):
        key = hashlib.sha256("\0".join([SOURCE, cc, version, *flags, platform.machine()]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"cf_sign_{key}.so"
        try:
            if not path.exists():
                _build(cc, flags, path)
            lib = ctypes.CDLL(str(path))
            break
        except (OSError, subprocess.SubprocessError):
            continue
    if lib is None:
        return None
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def encode(lib, codec, x: torch.Tensor, bits: int, blocks: list[slice], sub: torch.Tensor | None = None):
    """Fused encode of x (or of x.float() - sub, sub fp32 (n, c)); None when the reference must take
    over (NaN/Inf or sum overflow)."""
    n, c = x.shape
    if x.dtype == torch.float64:
        x = x.float()  # what the reference does first; fp32 from here on
    if x.stride(1) != 1 or x.stride(0) < c:
        x = x.contiguous()
    if sub is not None and not sub.is_contiguous():
        sub = sub.contiguous()
    sp = None if sub is None else sub.data_ptr()
    dt, ld, es = _DTYPES[x.dtype], x.stride(0), x.element_size()
    p = -(-c // (8 // bits))
    payload = torch.empty(n * p + 2 * (n + c), dtype=torch.uint8)
    base = payload.data_ptr()
    # One scratch allocation (allocations cost as much as a small kernel here): tok, 2 floats for
    # cf_sign_stats, then the |x| block buffer, each starting 64-byte aligned like a fresh tensor.
    rows0 = blocks[0].stop - blocks[0].start
    off = -(-(n + 2) // 16) * 16
    scratch = torch.empty(off + rows0 * c, dtype=torch.float32)
    tok, work = scratch[:n], scratch[n:n + 2]
    buf = scratch[off:].view(rows0, c)
    chan = None
    xp = x.data_ptr()
    for rows in blocks:
        k = rows.stop - rows.start
        ab = buf if k == buf.shape[0] else buf[:k]
        lib.cf_abs_bits(xp + rows.start * ld * es, dt, k, c, ld, None if sp is None else sp + rows.start * c * 4,
                        ab.data_ptr(), base + rows.start * p if bits == 1 else None, p)
        # Same calls on the same block shapes as sign._abs_sums: identical fp32 sums.
        torch.sum(ab, 1, out=tok if k == n else tok[rows])
        part = ab.sum(0)
        chan = part if chan is None else chan.add_(part)  # == zeros + part + ... (sums of |x| are never -0)
    lib.cf_div_sums(tok.data_ptr(), n, chan.data_ptr(), c)
    mean = float(tok.mean())
    if lib.cf_sign_stats(tok.data_ptr(), n, chan.data_ptr(), c, mean, work.data_ptr()):
        return None
    sqrt_q = float(torch.sqrt(work[0]))  # torch's sqrt, bit for bit what balance_gain computes
    a_ptr = base + n * p
    lib.cf_sign_factors(tok.data_ptr(), n, chan.data_ptr(), c, mean, work.data_ptr(), sqrt_q, a_ptr, a_ptr + 2 * n)
    if bits == 2:
        if lib.cf_int2_fields(x.data_ptr(), dt, n, c, ld, sp, a_ptr, a_ptr + 2 * n, base, p):
            raise MemoryError(f"int2 encode: no memory for {c} channel factors")
    return payload


@functools.cache
def _levels(levels: tuple[float, ...]):
    # Built once per level set; the kernel only reads it.
    return (ctypes.c_float * 4)(*levels, *([0.0] * (4 - len(levels))))


def decode(lib, payload: torch.Tensor, n: int, c: int, bits: int, levels: tuple[float, ...], dtype,
           add_to: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat as ``dtype``; with ``add_to`` (fp32, (n, c)): add_to + x_hat in fp32, in the same pass."""
    if add_to is not None:
        dtype = torch.float32
        if not add_to.is_contiguous():
            add_to = add_to.contiguous()
    odt = _DTYPES.get(dtype, 0)
    out = torch.empty(n, c, dtype=dtype if dtype in _DTYPES else torch.float32)
    if not payload.is_contiguous():
        payload = payload.contiguous()
    if lib.cf_sign_decode(payload.data_ptr(), n, c, bits, _levels(tuple(levels)), out.data_ptr(), odt,
                          None if add_to is None else add_to.data_ptr()):
        raise MemoryError(f"sign decode: no memory for {c} channel factors")
    return out if dtype in _DTYPES else out.to(dtype)
