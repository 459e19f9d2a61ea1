"""Seeded rectified-flow training of the bundled digits model (``compactfusion train-digits``).

Recipe (measured on a 2-core CPU, see the platform notes): x_t = (1 - t) x0 + t eps, the model predicts
eps - x0, t logit-normal; AdamW lr 5e-4 with a 50-step warm-up, betas (0.9, 0.99), grad clip 1.0, bf16
autocast on CPU, EMA, 10 % label dropout to the null class for classifier-free guidance (loop: ``_train.fit``).
"""
from __future__ import annotations

import torch

from ._train import fit, parse_train_args
from .digits import NULL_CLASS, build_digits_pipeline, image_ids, load_digits_pipeline, pack, save_digits_pipeline
from .digits_data import load_digits_tensors


def train(out: str, steps: int = 600, batch: int = 64, lr: float = 5e-4, seed: int = 0, max_minutes: float = 20.0,
          threads: int | None = None, log_every: int = 50, resume: str | None = None,
          cosine: bool = False) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    pipe = load_digits_pipeline(resume) if resume else build_digits_pipeline(seed)
    model, embedder = pipe.transformer, pipe.label_embedder
    data, labels = load_digits_tensors(32)
    img_ids = image_ids(32, 32)
    txt_ids = torch.zeros(embedder.config.text_tokens, 3)

    def batch_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        x0, y = pack(data[idx]), labels[idx].clone()
        y[torch.rand(batch, generator=gen) < 0.1] = NULL_CLASS
        t = torch.sigmoid(torch.randn(batch, generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            text, pooled = embedder(y)
            pred = model(hidden_states=xt, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                         img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), eps - x0)

    run = fit(pipe, batch_loss, steps=steps, lr=lr, seed=seed, max_minutes=max_minutes, log_every=log_every,
              resume=resume, cosine=cosine)
    meta = {"steps": run["steps"], "resumed_from": resume, "batch": batch, "lr": lr, "cosine": cosine, "seed": seed,
            "loss_ema": run["loss_ema"], "train_seconds": run["train_seconds"], "torch": torch.__version__}
    save_digits_pipeline(pipe, out, metadata=meta)
    return meta


def main(argv=None) -> int:
    a = parse_train_args(argv, "compactfusion train-digits", __doc__.splitlines()[0], steps=600, batch=64, lr=5e-4,
                         what="digits-pipeline")
    print(train(a.out, a.steps, a.batch, a.lr, a.seed, a.max_minutes, a.threads, resume=a.resume,
                cosine=a.cosine))
    return 0
