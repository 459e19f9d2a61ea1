"""Fidelity against the single-device output (scikit-image / torchmetrics; nothing hand-rolled)."""
from __future__ import annotations

import numpy as np


def _as_hwc(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    if a.max() > 1.0 + 1e-6:  # PIL / uint8 input
        a = a / 255.0
    return a[..., None] if a.ndim == 2 else a


def psnr(reference, image) -> float:
    from skimage.metrics import peak_signal_noise_ratio
    ref, img = _as_hwc(reference), _as_hwc(image)
    if np.array_equal(ref, img):
        return float("inf")
    return float(peak_signal_noise_ratio(ref, img, data_range=1.0))


def ssim(reference, image) -> float:
    from skimage.metrics import structural_similarity
    ref, img = _as_hwc(reference), _as_hwc(image)
    win = min(7, *ref.shape[:2]) // 2 * 2 + 1 if min(ref.shape[:2]) < 7 else 7
    return float(structural_similarity(ref, img, channel_axis=-1, data_range=1.0, win_size=win))


def finite_psnr(value: float, cap: float = 100.0) -> float:
    """JSON has no infinity: identical images are reported as ``cap`` dB."""
    return cap if not np.isfinite(value) else round(value, 3)
