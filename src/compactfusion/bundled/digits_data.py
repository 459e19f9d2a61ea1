"""Real training data for the bundled model (scikit-learn's digits) and the classifier that grades samples."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def load_digits_tensors(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 real 8x8 digits scaled to [-1, 1] and bilinearly upsampled to size x size: (N, 1, size, size), labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


def to_digits_features(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Generated images in [0, 1], (B, H, W[, 1]) or (B, 1, H, W), -> area-averaged 8x8 in sklearn's 0-16 scale."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 4:
        x = x[:, 0]
    x = F.adaptive_avg_pool2d(x[:, None], (8, 8))[:, 0]
    return (x * 16.0).reshape(x.shape[0], 64).numpy()


def train_digit_classifier():
    """Logistic regression on the real digits (seconds); grades whether generated samples show the asked digit."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    return LogisticRegression(max_iter=2000).fit(d.data, d.target)


def digit_accuracy(images, labels, classifier=None) -> float:
    clf = classifier or train_digit_classifier()
    pred = clf.predict(to_digits_features(images))
    return float((pred == np.asarray(labels)).mean())
