"""``python -m compactfusion.codecs.fused``: build (or find) the CPU kernels now and report the backends.

Useful as a set-up step, so that the first encode of a multi-rank run does not wait for the compiler.
"""
from __future__ import annotations

import sys

import torch

from . import backend, cpu


def main() -> int:
    lib = cpu.load()
    if lib is None:
        print("cpu: no working C compiler; binary/int2 use the PyTorch reference")
    else:
        print(f"cpu: fused C kernels ready ({'AVX2+F16C' if lib.cf_simd() else 'portable C'}): {lib._name}")
    if torch.cuda.is_available():
        print(f"cuda: {backend('auto', torch.device('cuda'))}")
    return 0 if lib is not None else 1


if __name__ == "__main__":
    sys.exit(main())
