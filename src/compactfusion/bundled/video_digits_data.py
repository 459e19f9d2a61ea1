"""Moving-digit clips for the bundled video model, and the per-frame classifier that grades its samples.

A clip: one of scikit-learn's 1797 real 8x8 digits, at its native 8x8 resolution, pasted into a
FRAME_SIZE x FRAME_SIZE black frame and moved by a fixed integer velocity (vy, vx) in {-1, 0, 1}^2 per
frame; the start is drawn so that the digit stays whole in every frame. Values in [-1, 1].
"""
from __future__ import annotations

import numpy as np
import torch

from .video_digits import FRAME_SIZE, NUM_FRAMES

DIGIT = 8  # sklearn's digits are 8x8


def load_digit_sprites() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 real digits as (N, 8, 8) in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0 * 2 - 1, torch.tensor(d.target, dtype=torch.long)


def _starts(v: int, frames: int, size: int, gen: torch.Generator) -> int:
    lo, hi = max(0, -v * (frames - 1)), min(size - DIGIT, size - DIGIT - v * (frames - 1))
    if hi < lo:
        raise ValueError(f"a {DIGIT}-pixel digit moving {v} px/frame does not fit {frames} frames of {size} pixels")
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def moving_clips(sprites: torch.Tensor, gen: torch.Generator, frames: int = NUM_FRAMES,
                 size: int = FRAME_SIZE) -> torch.Tensor:
    """(B, 8, 8) sprites -> (B, 1, frames, size, size) clips with a random fixed velocity each."""
    b = sprites.shape[0]
    clips = torch.full((b, 1, frames, size, size), -1.0)
    vel = torch.randint(-1, 2, (b, 2), generator=gen)
    for i in range(b):
        vy, vx = int(vel[i, 0]), int(vel[i, 1])
        y0, x0 = _starts(vy, frames, size, gen), _starts(vx, frames, size, gen)
        for f in range(frames):
            y, x = y0 + vy * f, x0 + vx * f
            clips[i, 0, f, y:y + DIGIT, x:x + DIGIT] = sprites[i]
    return clips


def crop_digit(frames: np.ndarray) -> np.ndarray:
    """Frames in [0, 1], (N, H, W), -> the 8x8 window centred on each frame's centre of mass, in sklearn's 0-16 scale."""
    x = np.clip(np.asarray(frames, dtype=np.float64), 0, 1)
    n, h, w = x.shape
    mass = x.sum(axis=(1, 2)) + 1e-9
    cy = (x.sum(axis=2) * np.arange(h)).sum(axis=1) / mass
    cx = (x.sum(axis=1) * np.arange(w)).sum(axis=1) / mass
    y0 = np.clip(np.round(cy - (DIGIT - 1) / 2).astype(int), 0, h - DIGIT)
    x0 = np.clip(np.round(cx - (DIGIT - 1) / 2).astype(int), 0, w - DIGIT)
    out = np.stack([x[i, y0[i]:y0[i] + DIGIT, x0[i]:x0[i] + DIGIT] for i in range(n)])
    return (out * 16.0).reshape(n, DIGIT * DIGIT)


def _frames_of(videos) -> np.ndarray:
    """(B, F, H, W[, 1]) videos -> (B*F, H, W) frames."""
    v = np.asarray(videos, dtype=np.float64)
    v = v[..., 0] if v.ndim == 5 else v
    return v.reshape(-1, *v.shape[-2:])


def train_frame_classifier(seed: int = 0, placements: int = 3):
    """3-nearest-neighbours on centre-of-mass crops of the real digits placed at random in a frame.

    Fitted on the same crop the grader applies to generated frames, so the crop's offset (a digit's centre
    of mass is not its box centre) is part of what it knows. k-NN rather than the image model's logistic
    regression: it fits in milliseconds (LBFGS took 20-50 s on a loaded 2-core machine)."""
    from sklearn.neighbors import KNeighborsClassifier
    sprites, labels = load_digit_sprites()
    gen = torch.Generator().manual_seed(seed)
    clips = torch.cat([moving_clips(sprites, gen, frames=1) for _ in range(placements)])
    x = crop_digit(((clips[:, 0, 0] + 1) / 2).numpy())
    return KNeighborsClassifier(n_neighbors=3).fit(x, labels.repeat(placements).numpy())


def frame_accuracy(videos, labels, classifier=None) -> float:
    """Share of frames (of every video) classified as the video's label."""
    clf = classifier or train_frame_classifier()
    frames = _frames_of(videos)
    per_video = frames.shape[0] // len(labels)
    pred = clf.predict(crop_digit(frames))
    return float((pred == np.repeat(np.asarray(labels), per_video)).mean())
