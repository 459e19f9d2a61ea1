"""The bundled model: a small class-conditional Flux-architecture transformer trained on real digits.

It exists so that the main job, the tests and the benchmarks run offline on a model whose activations
behave like a trained model's (random weights do not have the step-to-step redundancy the method relies
on). Architecture: a stock ``FluxTransformer2DModel`` (double- and single-stream blocks, joint text-image
attention, rotary embeddings); the class label is mapped to 4 learned "text" tokens and a pooled vector,
so the joint-attention path is exercised with trained weights. Images are 32x32, one channel, in pixel
space; Flux's 2x2 packing gives 16x16 = 256 image tokens with 4 channels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from PIL import Image

from ._folder import save_pipeline_folder
from ._sampling import GuidedPipelineMixin, cfg_labels, check_call, denoise, draw_noise
from ._sampling import NULL_CLASS, NUM_CLASSES, parse_label  # noqa: F401 - public here (train, serve, cli, bench)

BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "digits"
IMAGE_SIZE = 32
PACK = 2  # Flux packs 2x2 pixels into one token


def transformer_config() -> dict:
    return dict(patch_size=1, in_channels=PACK * PACK, num_layers=2, num_single_layers=4, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
                axes_dims_rope=(8, 12, 12))


class DigitsLabelEmbedder(ModelMixin, ConfigMixin):
    """Maps a class label (0-9, or 10 = null) to ``text_tokens`` joint-attention tokens and a pooled vector."""

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, text_tokens: int = 4, joint_dim: int = 64, pooled_dim: int = 64):
        super().__init__()
        self.tokens = torch.nn.Embedding(num_classes + 1, text_tokens * joint_dim)
        self.pooled = torch.nn.Embedding(num_classes + 1, pooled_dim)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return self.tokens(labels).view(-1, cfg.text_tokens, cfg.joint_dim), self.pooled(labels)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, H/2 * W/2, 4) tokens, Flux's 2x2 packing."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.view(b, height // PACK, width // PACK, 1, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, 1, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    gh, gw = height // PACK, width // PACK
    ids = torch.zeros(gh, gw, 3)
    ids[..., 1] = torch.arange(gh)[:, None]
    ids[..., 2] = torch.arange(gw)[None, :]
    return ids.view(gh * gw, 3)


class DigitsPipelineOutput(BaseOutput):
    images: list | np.ndarray | torch.Tensor


class DigitsPipeline(GuidedPipelineMixin, DiffusionPipeline):
    """Rectified-flow sampler for the bundled digits model (Euler steps, classifier-free guidance).

    The denoising loop is a stock diffusers loop: one ``transformer`` call per step with the conditional
    and unconditional halves batched together, so every parallel strategy (and CFG parallel) applies as
    it would to Flux, SD3 or PixArt.
    """

    model_cpu_offload_seq = "label_embedder->transformer"

    def __init__(self, transformer: FluxTransformer2DModel, label_embedder: DigitsLabelEmbedder,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, label_embedder=label_embedder, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt=0, num_inference_steps: int = 20, guidance_scale: float = 2.5, height: int = IMAGE_SIZE,
                 width: int = IMAGE_SIZE, generator: torch.Generator | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", return_dict: bool = True):
        labels = check_call(prompt, num_images_per_prompt, num_inference_steps, output_type)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % PACK:
                raise ValueError(f"{name} must be a positive multiple of {PACK}, got {v!r}")
        self._guidance_scale = guidance_scale
        device = self._execution_device
        dtype = self.transformer.dtype

        text, pooled = self.label_embedder(cfg_labels(labels, self.do_classifier_free_guidance, device))
        text, pooled = text.to(dtype), pooled.to(dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
        img_ids = image_ids(height, width).to(device=device, dtype=dtype)
        noise = draw_noise(generator, len(labels), (1, height, width), "images")
        latents = pack(noise).to(device=device, dtype=dtype)

        def velocity_of(model_in, t):
            timestep = (t / 1000.0).expand(model_in.shape[0]).to(dtype)
            return self.transformer(hidden_states=model_in, encoder_hidden_states=text, pooled_projections=pooled,
                                    timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

        latents = denoise(self, latents, num_inference_steps, guidance_scale, velocity_of)
        images = ((unpack(latents.float(), height, width) + 1) / 2).clamp(0, 1)  # (B, 1, H, W) in [0, 1]
        if output_type == "pt":
            out = images
        else:
            arr = images.permute(0, 2, 3, 1).cpu().numpy()
            out = arr if output_type == "np" else [Image.fromarray((a[..., 0] * 255).round().astype(np.uint8), "L") for a in arr]
        self.maybe_free_model_hooks()
        return DigitsPipelineOutput(images=out) if return_dict else (out,)


def is_digits_folder(path: str | Path) -> bool:
    return (Path(path) / "digits_pipeline.json").is_file()


def save_digits_pipeline(pipe: DigitsPipeline, path: str | Path, metadata: dict | None = None) -> None:
    save_pipeline_folder(pipe, path, "digits_pipeline.json", 'DigitsPipeline', metadata)


def load_digits_pipeline(path: str | Path | None = None, torch_dtype: torch.dtype = torch.float32) -> DigitsPipeline:
    """Load the bundled model (default) or a folder written by ``save_digits_pipeline``. Fully offline."""
    path = Path(path) if path is not None else BUNDLED_DIR
    if not is_digits_folder(path):
        raise ValueError(f"{path} is not a digits-pipeline folder (no digits_pipeline.json); "
                         f"train one with `compactfusion train-digits --out DIR`")
    transformer = FluxTransformer2DModel.from_pretrained(path / "transformer", torch_dtype=torch_dtype)
    embedder = DigitsLabelEmbedder.from_pretrained(path / "label_embedder", torch_dtype=torch_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    pipe = DigitsPipeline(transformer=transformer.eval(), label_embedder=embedder.eval(), scheduler=scheduler)
    return pipe


def build_digits_pipeline(seed: int = 0) -> DigitsPipeline:
    """A fresh, untrained pipeline with the bundled architecture (for training and for tests)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**transformer_config())
    embedder = DigitsLabelEmbedder()
    return DigitsPipeline(transformer=transformer, label_embedder=embedder, scheduler=FlowMatchEulerDiscreteScheduler())
