"""Fused CPU path for ``binary``/``int2``: small C kernels built once with the system C compiler.

Why C through ctypes: measured on the 2-core CI box, torch.compile (inductor's C++ backend) costs
~140 us of dispatch per call at 64x128 and produced a 15 ms decode at 1088x3072 (the reference
takes ~5 ms); a 200-line C file with AVX2 intrinsics decodes that shape in well under 1 ms and
needs no new dependency. The build is cached on disk, keyed by the source, the compiler and the
flags, and loaded once per process; without a working compiler the codecs use the reference.

Byte equality with the reference: the sums whose value depends on the summation order (row/column
sums of |x| and the sum inside mean(tok)) are still computed by torch's sum on the same block
shapes as sign.py, as is the square root; only |x| itself (exact), the sign/int2 fields and the
elementwise scale arithmetic (including mean's one division) move into C. The kernels share
torch's OpenMP runtime (torch ships libgomp.so.1, so the loader reuses it) and hence its thread
count.

Small shapes (a 64x128 stream): the cost is dispatch, not arithmetic, so an encode is one fresh
payload, four C calls and four torch calls writing into cached scratch (ScratchCache) whose raw
pointers the kernels read: no per-call scratch allocation, slicing or tensor -> float round trip.
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
import threading
from pathlib import Path

import torch

from ..numeric import CPU_BLOCK_ELEMS, row_blocks
from .csrc import SOURCE

#: Set to a directory to keep the built kernels elsewhere (default ~/.cache/compactfusion/kernels).
CACHE_ENV = "COMPACTFUSION_KERNEL_CACHE"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_VP, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "cf_abs_bits": (None, [_VP, _I32, _I64, _I64, _I64, _VP, _VP, _VP, _I64]),
    "cf_div_sums": (None, [_VP, _I64, _VP, _I64]),
    "cf_sign_stats": (_I32, [_VP, _I64, _VP, _I64, _VP, _VP]),
    "cf_sign_finish": (_I32, [_VP, _I64, _VP, _I64, _VP, _VP, _VP, _I32, _VP, _I32, _I64, _VP, _VP, _I64]),
    "cf_sign_decode": (_I32, [_VP, _I64, _I64, _I32, _VP, _VP, _I32, _VP]),
    "cf_simd": (_I32, []),
}
#: Encodes whose |x| block has at most this many elements keep their scratch between calls (see
#: ScratchCache): at 64x128 allocating and slicing it cost as much as the kernels. Larger shapes
#: allocate per call (noise next to their passes) so that idle codecs hold no big buffers.
SCRATCH_CACHE_ELEMS = 1 << 16
#: Distinct small shapes kept per codec and thread before the cache starts over.
SCRATCH_CACHE_SHAPES = 16


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


class Scratch:
    """fp32 scratch of one encode shape: tok (n), chan (c), sum then mean of tok, work (2), sqrt(work[0]), then
    the |x| block buffer (rows0 x c); each part starts 64-byte aligned like a fresh tensor. The
    views and raw pointers are made once. It carries nothing from one encode to the next: every
    element is written before it is read, and nothing returned to the caller points into it."""

    __slots__ = ("mem", "tok", "chan", "mean", "q", "root", "buf", "tok_p", "chan_p", "mean_p", "work_p",
                 "root_p", "buf_p")

    def __init__(self, n: int, c: int, rows0: int):
        o_chan = -(-n // 16) * 16
        o_mean = o_chan + -(-c // 16) * 16
        o_buf = o_mean + 16
        # A normal tensor even when first made under torch.inference_mode(): an inference tensor could
        # not be written to (out=) by a later encode outside it.
        with torch.inference_mode(False):
            self.mem = torch.empty(o_buf + rows0 * c, dtype=torch.float32)
            self.tok, self.chan = self.mem[:n], self.mem[o_chan:o_chan + c]
            self.mean, self.q, self.root = self.mem[o_mean], self.mem[o_mean + 1], self.mem[o_mean + 3]  # 0-dim
            self.buf = self.mem[o_buf:].view(rows0, c)
        base = self.mem.data_ptr()
        self.tok_p, self.chan_p, self.buf_p = base, base + 4 * o_chan, base + 4 * o_buf
        self.mean_p, self.work_p, self.root_p = base + 4 * o_mean, base + 4 * (o_mean + 1), base + 4 * (o_mean + 3)


class ScratchCache(threading.local):
    """Per-thread small-shape Scratch of one codec instance (threads never share a buffer). Copying or
    pickling a codec gives it an empty cache: buffers are not part of a codec's value."""

    def __init__(self):
        self.by_shape: dict[tuple[int, int, int], Scratch] = {}

    def get(self, n: int, c: int, rows0: int) -> Scratch:
        s = self.by_shape.get((n, c, rows0))
        if s is None:
            if rows0 * c > SCRATCH_CACHE_ELEMS:
                return Scratch(n, c, rows0)
            if len(self.by_shape) >= SCRATCH_CACHE_SHAPES:
                self.by_shape.clear()
            s = self.by_shape[(n, c, rows0)] = Scratch(n, c, rows0)
        return s

    def __reduce__(self):
        return (type(self), ())


def encode(lib, codec, x: torch.Tensor, bits: int, blocks: list[slice] | None = None,
           sub: torch.Tensor | None = None):
    """Fused encode of x (or of x.float() - sub, sub fp32 (n, c)); None when the reference must take
    over (NaN/Inf or sum overflow). ``blocks``: row_blocks(n, c, cpu), computed here when None.
    Scratch comes from ``codec.scratch`` (a ScratchCache) where the codec has one."""
    n, c = x.shape
    if x.dtype == torch.float64:
        x = x.float()  # what the reference does first; fp32 from here on
    if x.stride(1) != 1 or x.stride(0) < c:
        x = x.contiguous()
    if sub is not None and not sub.is_contiguous():
        sub = sub.contiguous()
    if blocks is None and n * c > CPU_BLOCK_ELEMS:
        blocks = row_blocks(n, c, x.device)
    rows0 = n if blocks is None else blocks[0].stop - blocks[0].start
    cache = getattr(codec, "scratch", None)
    s = cache.get(n, c, rows0) if isinstance(cache, ScratchCache) else Scratch(n, c, rows0)
    sp = None if sub is None else sub.data_ptr()
    dt, ld = _DTYPES[x.dtype], x.stride(0)
    p = -(-c // (8 // bits))
    payload = torch.empty(n * p + 2 * (n + c), dtype=torch.uint8)  # fresh: the caller keeps it
    base, xp = payload.data_ptr(), x.data_ptr()
    if rows0 == n:  # one block (every shape up to CPU_BLOCK_ELEMS)
        lib.cf_abs_bits(xp, dt, n, c, ld, sp, s.buf_p, base if bits == 1 else None, p)
        # Same calls on the same block shape as sign._abs_sums: identical fp32 sums (zeros + s == s,
        # sums of |x| are never -0, so the column sum goes straight into chan).
        torch.sum(s.buf, 1, out=s.tok)
        torch.sum(s.buf, 0, out=s.chan)
    else:
        es = x.element_size()
        for rows in blocks:
            k = rows.stop - rows.start
            ab = s.buf if k == rows0 else s.buf[:k]
            lib.cf_abs_bits(xp + rows.start * ld * es, dt, k, c, ld, None if sp is None else sp + rows.start * c * 4,
                            ab.data_ptr(), base + rows.start * p if bits == 1 else None, p)
            torch.sum(ab, 1, out=s.tok[rows])
            if rows.start == 0:
                torch.sum(ab, 0, out=s.chan)
            else:
                s.chan.add_(ab.sum(0))
    lib.cf_div_sums(s.tok_p, n, s.chan_p, c)
    torch.sum(s.tok, 0, out=s.mean)  # cf_sign_stats turns it into tok.mean() (see csrc.py)
    if lib.cf_sign_stats(s.tok_p, n, s.chan_p, c, s.mean_p, s.work_p):
        return None
    torch.sqrt(s.q, out=s.root)  # torch's sqrt, bit for bit what balance_gain computes
    if lib.cf_sign_finish(s.tok_p, n, s.chan_p, c, s.mean_p, s.work_p, s.root_p, bits, xp, dt, ld, sp, base, p):
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
