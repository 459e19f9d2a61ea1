"""The model on every rank: load once, parallelize per codec, run one batch of jobs as one pipeline call.

A batch of several requests is one call with one prompt and one generator per image (each request's own
generator repeated for its images, so it draws the noise it would draw alone) and, when parallel,
``set_request_batches`` so each request keeps its own residual streams and codec scales.
"""
from __future__ import annotations

import argparse
import inspect

import numpy as np
import torch

from ..api import parallelize, set_request_batches, stats, unparallelize
from ..loading import call_kwargs, load_pipeline, spatial_factor


def codec_namespace(a: argparse.Namespace, codec: str) -> argparse.Namespace:
    """The server's flags with ``codec`` swapped in (residual flags only apply to a real codec)."""
    ns = argparse.Namespace(**dict(vars(a), codec=codec))
    if codec == "none":
        ns.residual, ns.no_error_feedback = 1, False
    return ns


class Engine:
    def __init__(self, a: argparse.Namespace, world: int, device: torch.device, dtype: torch.dtype):
        from ..cli.config import build_configs
        self.a, self.world = a, world
        self._build = build_configs
        self._load = lambda: load_pipeline(a.model, dtype, device)
        self.pipe = self._load()
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)
        self.factor = spatial_factor(self.pipe)
        self.codec: str | None = None
        # read before parallelize, which swaps in a subclass with a (*args, **kwargs) __call__
        params = inspect.signature(type(self.pipe).__call__).parameters
        self.takes_negative_prompt = "negative_prompt" in params
        self.size = self._default_size(params)

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def _default_size(self, params) -> tuple[int, int]:
        """(width, height) the pipeline uses when none is given."""
        w, h = params.get("width"), params.get("height")
        if w is not None and h is not None and isinstance(w.default, int) and isinstance(h.default, int):
            return w.default, h.default
        cfg = getattr(getattr(self.pipe, "transformer", None), "config", None)
        side = int(getattr(cfg, "sample_size", 64) or 64) * int(getattr(self.pipe, "vae_scale_factor", 8))
        return side, side

    def ensure_codec(self, codec: str) -> None:
        """Collective (same order on every rank): re-parallelize when the batch's codec differs."""
        if not self.parallel or codec == self.codec:
            return
        cfg, _, _ = self._build(codec_namespace(self.a, codec), self.world)
        if self.codec is not None:
            unparallelize(self.pipe)
            self.codec = None
            if cfg.strategy == "pipefusion":  # the stage released the other stages' weights: load afresh
                self.pipe = self._load()
        parallelize(self.pipe, cfg)
        self.pipe.set_progress_bar_config(disable=True)
        self.codec = codec

    def run(self, jobs: list[dict]) -> tuple[list[np.ndarray], dict]:
        """Images per job (N, H, W, C in [0, 1]) and this rank's byte counts for the call."""
        j0 = jobs[0]
        self.ensure_codec(j0["codec"])
        if len(jobs) == 1:
            kw = call_kwargs(self.pipe, j0["prompt"], j0["steps"], j0["seed"], j0["height"], j0["width"],
                             j0["guidance_scale"], j0["n"])
        else:
            prompts = [j["prompt"] for j in jobs for _ in range(j["n"])]
            kw = call_kwargs(self.pipe, prompts, j0["steps"], 0, j0["height"], j0["width"], j0["guidance_scale"], 1)
            gens = []
            for j in jobs:
                g = torch.Generator().manual_seed(j["seed"])
                gens += [g] * j["n"]  # one generator drawn image after image == one draw of n images
            kw["generator"] = gens
        if j0["negative_prompt"] is not None:
            kw["negative_prompt"] = j0["negative_prompt"] if len(jobs) == 1 else \
                [j["negative_prompt"] for j in jobs for _ in range(j["n"])]
        batched = self.parallel and len(jobs) > 1
        if batched:
            set_request_batches(self.pipe, [j["n"] for j in jobs])
        try:
            images = np.asarray(self.pipe(**kw).images)
        finally:
            if batched:
                set_request_batches(self.pipe, None)
        out, i = [], 0
        for j in jobs:
            out.append(images[i:i + j["n"]])
            i += j["n"]
        s = stats(self.pipe) if self.parallel else {}
        local = {k: float(s.get(k, 0) or 0) for k in ("bytes_sent", "bytes_uncompressed", "modeled_comm_s")}
        return out, local
