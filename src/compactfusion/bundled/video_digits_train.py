"""Seeded rectified-flow training of the bundled video model (``compactfusion train-video-digits``).

Recipe (the image model's, loop in ``_train.fit``): x_t = (1 - t) x0 + t eps, the model predicts eps - x0,
t logit-normal (given to Wan as 1000 t); AdamW with a 50-step warm-up, betas (0.9, 0.99), grad clip 1.0, fp32,
EMA 0.995, 10 % label dropout to the null class for classifier-free guidance. Every batch draws fresh clips
(digit, velocity, start) from the seeded generator, so the run is reproducible for a given seed, steps and
thread count.
"""
from __future__ import annotations

import torch

from ._train import fit, parse_train_args
from .digits import NULL_CLASS
from .video_digits import build_video_digits_pipeline, load_video_digits_pipeline, save_video_digits_pipeline
from .video_digits_data import load_digit_sprites, moving_clips


def train(out: str, steps: int = 1000, batch: int = 32, lr: float = 1e-3, seed: int = 0, max_minutes: float = 20.0,
          threads: int | None = None, log_every: int = 50, resume: str | None = None,
          cosine: bool = False) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    pipe = load_video_digits_pipeline(resume) if resume else build_video_digits_pipeline(seed)
    model, embedder = pipe.transformer, pipe.label_embedder
    sprites, labels = load_digit_sprites()

    def batch_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, sprites.shape[0], (batch,), generator=gen)
        x0, y = moving_clips(sprites[idx], gen), labels[idx].clone()
        y[torch.rand(batch, generator=gen) < 0.1] = NULL_CLASS
        t = torch.sigmoid(torch.randn(batch, generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * eps
        pred = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=embedder(y), return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), eps - x0)

    run = fit(pipe, batch_loss, steps=steps, lr=lr, seed=seed, max_minutes=max_minutes, log_every=log_every,
              resume=resume, cosine=cosine)
    meta = {"steps": run["steps"], "resumed_from": resume, "batch": batch, "lr": lr, "cosine": cosine, "seed": seed,
            "loss_ema": run["loss_ema"], "threads": torch.get_num_threads(), "train_seconds": run["train_seconds"],
            "torch": torch.__version__}
    save_video_digits_pipeline(pipe, out, metadata=meta)
    return meta


def main(argv=None) -> int:
    a = parse_train_args(argv, "compactfusion train-video-digits", __doc__.splitlines()[0], steps=1000, batch=32,
                         lr=1e-3, what="video-digits")
    print(train(a.out, a.steps, a.batch, a.lr, a.seed, a.max_minutes, a.threads, resume=a.resume,
                cosine=a.cosine))
    return 0
