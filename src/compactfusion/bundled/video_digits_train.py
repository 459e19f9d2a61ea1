"""Seeded rectified-flow training of the bundled video model (``compactfusion train-video-digits``).

Recipe (the image model's): x_t = (1 - t) x0 + t eps, the model predicts eps - x0, t logit-normal (given to
Wan as 1000 t); AdamW with a 50-step warm-up, betas (0.9, 0.99), grad clip 1.0, fp32, EMA 0.995, 10 % label
dropout to the null class for classifier-free guidance. Every batch draws fresh clips (digit, velocity,
start) from the seeded generator, so the run is reproducible for a given seed, steps and thread count.
"""
from __future__ import annotations

import argparse
import time

import torch

from .digits import NULL_CLASS
from .video_digits import build_video_digits_pipeline, load_video_digits_pipeline, save_video_digits_pipeline
from .video_digits_data import load_digit_sprites, moving_clips


def train(out: str, steps: int = 1000, batch: int = 32, lr: float = 1e-3, seed: int = 0, max_minutes: float = 20.0,
          threads: int | None = None, log_every: int = 50, resume: str | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    pipe = load_video_digits_pipeline(resume) if resume else build_video_digits_pipeline(seed)
    model, embedder = pipe.transformer.train(), pipe.label_embedder.train()
    params = list(model.parameters()) + list(embedder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    sprites, labels = load_digit_sprites()
    gen = torch.Generator().manual_seed(seed)
    start, loss_ema, step = time.time(), None, 0
    for step in range(1, steps + 1):
        idx = torch.randint(0, sprites.shape[0], (batch,), generator=gen)
        x0, y = moving_clips(sprites[idx], gen), labels[idx].clone()
        y[torch.rand(batch, generator=gen) < 0.1] = NULL_CLASS
        t = torch.sigmoid(torch.randn(batch, generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * eps
        for g in opt.param_groups:
            g["lr"] = lr * (1.0 if resume else min(1.0, step / 50))
        pred = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=embedder(y), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        elapsed = time.time() - start
        if step % log_every == 0 or step == 1:
            print(f"step {step:5d}  loss(ema) {loss_ema:.4f}  {elapsed:6.0f} s", flush=True)
        if elapsed > max_minutes * 60:
            print(f"stopping at step {step}: time budget of {max_minutes} min reached", flush=True)
            break
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    pipe.transformer.eval(), pipe.label_embedder.eval()
    meta = {"steps": step, "resumed_from": resume, "batch": batch, "lr": lr, "seed": seed, "loss_ema": round(loss_ema, 5),
            "threads": torch.get_num_threads(), "train_seconds": round(time.time() - start, 1), "torch": torch.__version__}
    save_video_digits_pipeline(pipe, out, metadata=meta)
    return meta


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (the CLI turns ValueError into "error: ..." + exit 2)
        raise ValueError(message)


def main(argv=None) -> int:
    p = _Parser(prog="compactfusion train-video-digits", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write the trained pipeline to")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", default=None, help="continue from a video-digits folder")
    a = p.parse_args(argv)
    for name in ("steps", "batch"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name} must be positive")
    print(train(a.out, a.steps, a.batch, a.lr, a.seed, a.max_minutes, a.threads, resume=a.resume))
    return 0
