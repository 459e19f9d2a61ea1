"""The sampling loop shared by the bundled pipelines (digits images, moving-digits videos).

Rectified-flow Euler steps with classifier-free guidance: one ``transformer`` call per step with the
conditional and unconditional halves batched together (so every parallel strategy, CFG parallel included,
applies as it would to a stock diffusers model). What differs per model (how the transformer is called,
the latent shape) is passed in.
"""
from __future__ import annotations

from typing import Callable

import torch

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the label used for the unconditional branch of classifier-free guidance
OUTPUT_TYPES = ("pil", "np", "pt")


def parse_label(prompt) -> int:
    """Prompts for the bundled models are digits: 7, "7" or "a 7"."""
    if isinstance(prompt, bool):
        raise TypeError(f"prompt must be a digit 0-9 (int or str), got {prompt!r}")
    if isinstance(prompt, int):
        value = prompt
    elif isinstance(prompt, str):
        digits = [ch for ch in prompt if ch.isdigit()]
        if len(digits) != 1:
            raise ValueError(f"the bundled digits model takes a single digit 0-9 as prompt, got {prompt!r}")
        value = int(digits[0])
    else:
        raise TypeError(f"prompt must be a digit 0-9 (int or str), got {type(prompt).__name__}")
    if not 0 <= value < NUM_CLASSES:
        raise ValueError(f"the bundled digits model takes a single digit 0-9 as prompt, got {prompt!r}")
    return value


class GuidedPipelineMixin:
    """diffusers' ``do_classifier_free_guidance`` property, read from the scale of the current call."""

    _guidance_scale = 1.0

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0


def check_call(prompt, num_images_per_prompt: int, num_inference_steps, output_type) -> list[int]:
    """The labels of a call (each prompt repeated ``num_images_per_prompt`` times), after checking the arguments."""
    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    labels = [parse_label(p) for p in prompts for _ in range(num_images_per_prompt)]
    if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
    return labels


def cfg_labels(labels: list[int], guided: bool, device) -> torch.Tensor:
    """Conditional labels, followed by as many null labels when guidance is on (the unconditional half)."""
    t = torch.tensor(labels, device=device)
    return torch.cat([t, torch.full_like(t, NULL_CLASS)]) if guided else t


def draw_noise(generator, batch: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """(batch, *shape) noise drawn on the CPU, so every rank and device starts alike.

    A list holds one generator per sample (diffusers' convention; a serving batch repeats each request's own
    generator for its samples, so every request draws the noise it would draw alone)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} {what}; pass one per {what[:-1]}")
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generator])
    return torch.randn((batch, *shape), generator=generator, dtype=torch.float32)


def denoise(pipe, latents: torch.Tensor, num_inference_steps: int, guidance_scale: float,
            velocity_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Euler steps from ``latents``; ``velocity_of(model_in, t)`` calls the transformer on the batched halves."""
    guided = guidance_scale > 1.0
    pipe.scheduler.set_timesteps(num_inference_steps, device=latents.device)
    for t in pipe.progress_bar(pipe.scheduler.timesteps):
        model_in = torch.cat([latents, latents]) if guided else latents
        velocity = velocity_of(model_in, t)
        if guided:
            cond, uncond = velocity.chunk(2)
            velocity = uncond + guidance_scale * (cond - uncond)
        latents = pipe.scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents
