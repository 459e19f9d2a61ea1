"""The training loop and command-line parser shared by the bundled models (``train-digits``, ``train-video-digits``).

Recipe: AdamW with a 50-step linear warm-up (none when resuming), betas (0.9, 0.99), grad clip 1.0, EMA of the
weights (decay min(0.995, (1 + step) / (10 + step))) copied into the model at the end. ``cosine=True`` decays the
learning rate to zero over ``steps`` (a final low-rate phase: with a tiny model the last few hundred steps at a
falling rate are worth more than many at a constant one). The model-specific part
(drawing a batch, the forward pass, the loss) is the caller's ``batch_loss``; it draws everything from the
seeded generator it is given, so a run is reproducible for a given seed, steps and thread count.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch

WARMUP_STEPS = 50


def fit(pipe, batch_loss: Callable[[torch.Generator], torch.Tensor], *, steps: int, lr: float, seed: int,
        max_minutes: float, log_every: int, resume: str | None, cosine: bool = False) -> dict:
    """Train ``pipe.transformer`` and ``pipe.label_embedder`` in place; returns steps run, loss EMA, seconds."""
    model, embedder = pipe.transformer.train(), pipe.label_embedder.train()
    params = list(model.parameters()) + list(embedder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    start, loss_ema, step = time.time(), None, 0
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr * (1.0 if resume else min(1.0, step / WARMUP_STEPS)) * (
                0.5 * (1 + math.cos(math.pi * (step - 1) / steps)) if cosine else 1.0)
        loss = batch_loss(gen)
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
    return {"steps": step, "loss_ema": round(loss_ema, 5), "train_seconds": round(time.time() - start, 1)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (the CLI turns ValueError into "error: ..." + exit 2)
        raise ValueError(message)


def parse_train_args(argv, prog: str, description: str, *, steps: int, batch: int, lr: float,
                     what: str) -> argparse.Namespace:
    """The flags both training commands take; ``what`` names the folder kind ``--resume`` expects."""
    p = _Parser(prog=prog, description=description)
    p.add_argument("--out", required=True, help="folder to write the trained pipeline to")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", default=None, help=f"continue from a {what} folder")
    p.add_argument("--cosine", action="store_true", help="decay the learning rate to zero over --steps")
    a = p.parse_args(argv)
    for name in ("steps", "batch"):
        if getattr(a, name) <= 0:
            raise ValueError(f"--{name} must be positive")
    return a
