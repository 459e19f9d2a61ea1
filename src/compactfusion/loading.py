"""Load a pipeline offline: a bundled model (digits, or ``bundled:video-digits``), a folder of one, or a diffusers
folder / cached hub id."""
from __future__ import annotations

from pathlib import Path

import torch

from .bundled.digits import DigitsPipeline, is_digits_folder, load_digits_pipeline
from .bundled.video_digits import VideoDigitsPipeline, is_video_digits_folder, load_video_digits_pipeline

#: ``--model`` names of the bundled models (``None`` is the digits model).
BUNDLED_DIGITS, BUNDLED_VIDEO = "bundled:digits", "bundled:video-digits"


def is_video_model(model: str | None) -> bool:
    return model == BUNDLED_VIDEO or (model is not None and Path(model).is_dir() and is_video_digits_folder(model))


def load_pipeline(model: str | None, dtype: torch.dtype, device: torch.device):
    if is_video_model(model):
        pipe = load_video_digits_pipeline(None if model == BUNDLED_VIDEO else model, torch_dtype=dtype)
    elif model in (None, BUNDLED_DIGITS) or (Path(model).is_dir() and is_digits_folder(model)):
        pipe = load_digits_pipeline(None if model == BUNDLED_DIGITS else model, torch_dtype=dtype)
    else:
        from diffusers import DiffusionPipeline
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
        except (OSError, EnvironmentError) as e:
            raise ValueError(f"cannot load model {model!r} offline ({str(e).splitlines()[0]}); pass a local diffusers "
                             f"folder or a hub id that is already in the local cache") from None
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    return pipe.to(device)


def call_kwargs(pipe, prompt, steps: int, seed: int, height=None, width=None, guidance_scale=None, num_images=1) -> dict:
    """Arguments for one pipeline call; the generator lives on the CPU so every rank and device draws the same noise."""
    kw = dict(prompt=prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np")
    if height is not None:
        kw["height"] = height
    if width is not None:
        kw["width"] = width
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    kw["num_images_per_prompt"] = num_images
    if isinstance(pipe, DigitsPipeline):
        kw["prompt"] = prompt
    return kw


def spatial_factor(pipe) -> int:
    """Height/width must be multiples of this (VAE downsampling x transformer patch x Flux packing)."""
    if isinstance(pipe, (DigitsPipeline, VideoDigitsPipeline)):
        return 2
    vae = getattr(pipe, "vae_scale_factor", 8)
    patch = getattr(getattr(pipe.transformer, "config", None), "patch_size", 1) or 1
    pack = 2 if type(pipe.transformer).__name__ == "FluxTransformer2DModel" else 1
    return int(vae) * int(patch) * pack
