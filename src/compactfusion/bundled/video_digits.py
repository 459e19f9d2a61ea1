"""The bundled video model: a small class-conditional Wan-architecture transformer trained on moving digits.

It exists so that compression can be measured offline on a *video* model with trained weights (long token
sequences over frames x height x width, where adjacent steps are most alike). Architecture: a stock
``WanTransformer3DModel`` (self-attention with 3-D rotary embeddings over frames x height x width, text as
cross-attention context, per-block timestep modulation); the class label is mapped to 4 learned "text"
tokens. Clips are 8 frames of 16x16 pixels, one channel, in pixel space; Wan's (1, 2, 2) patches give
8 x 8 x 8 = 512 video tokens. The training data (``video_digits_data``) are scikit-learn's real 8x8 digits
moving at a fixed velocity per clip.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from PIL import Image

from ._folder import save_pipeline_folder
from ._sampling import NUM_CLASSES, GuidedPipelineMixin, cfg_labels, check_call, denoise, draw_noise

BUNDLED_VIDEO_DIR = Path(__file__).resolve().parent / "assets" / "video-digits"
MARKER = "video_digits_pipeline.json"
NUM_FRAMES = 8
FRAME_SIZE = 16
PATCH = 2  # spatial patch of the (1, 2, 2) Wan patch embedding: height and width must be multiples of it
TEXT_DIM = 64
#: The sampler's default guidance: per-frame digit accuracy of the bundled asset (20 steps, 5 x 10 videos) is
#: 86 % at 2.5 and 92 % at 4.0 (the tiny model's frames drift towards other digits under weak guidance).
GUIDANCE = 4.0


def transformer_config() -> dict:
    # head_dim 24: Wan's rotary split gives 8 channels each to frames, height and width.
    return dict(patch_size=(1, PATCH, PATCH), num_attention_heads=4, attention_head_dim=24, in_channels=1,
                out_channels=1, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=256, num_layers=3, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=256)


class VideoDigitsLabelEmbedder(ModelMixin, ConfigMixin):
    """Maps a class label (0-9, or 10 = null) to ``text_tokens`` cross-attention tokens."""

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, text_tokens: int = 4, text_dim: int = TEXT_DIM):
        super().__init__()
        self.tokens = torch.nn.Embedding(num_classes + 1, text_tokens * text_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.tokens(labels).view(-1, self.config.text_tokens, self.config.text_dim)


class VideoDigitsPipelineOutput(BaseOutput):
    frames: list | np.ndarray | torch.Tensor


def _check_dims(height, width, num_frames) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % PATCH:
            raise ValueError(f"{name} must be a positive multiple of {PATCH}, got {v!r}")
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames <= 0:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")


class VideoDigitsPipeline(GuidedPipelineMixin, DiffusionPipeline):
    """Rectified-flow sampler for the bundled video model (Euler steps, classifier-free guidance).

    A stock diffusers loop: one ``transformer`` call per step, conditional and unconditional halves batched
    together, so every parallel strategy (and CFG parallel) applies as it would to Wan. Output ``frames``:
    ``np`` (B, F, H, W, 1) in [0, 1], ``pt`` (B, F, 1, H, W), ``pil`` one list of PIL frames per video.
    """

    model_cpu_offload_seq = "label_embedder->transformer"

    def __init__(self, transformer: WanTransformer3DModel, label_embedder: VideoDigitsLabelEmbedder,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, label_embedder=label_embedder, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt=0, num_inference_steps: int = 20, guidance_scale: float = GUIDANCE, height: int = FRAME_SIZE,
                 width: int = FRAME_SIZE, num_frames: int = NUM_FRAMES, generator: torch.Generator | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "np", return_dict: bool = True):
        labels = check_call(prompt, num_images_per_prompt, num_inference_steps, output_type)
        _check_dims(height, width, num_frames)
        self._guidance_scale = guidance_scale
        device = self._execution_device
        dtype = self.transformer.dtype

        text = self.label_embedder(cfg_labels(labels, self.do_classifier_free_guidance, device)).to(dtype)
        noise = draw_noise(generator, len(labels), (1, num_frames, height, width), "videos")
        latents = noise.to(device=device, dtype=dtype)  # (B, 1, F, H, W): pixel space

        def velocity_of(model_in, t):
            timestep = t.expand(model_in.shape[0])  # Wan embeds the 0..1000 scale directly
            return self.transformer(hidden_states=model_in, timestep=timestep, encoder_hidden_states=text,
                                    return_dict=False)[0]

        latents = denoise(self, latents, num_inference_steps, guidance_scale, velocity_of)
        video = ((latents.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, F, 1, H, W) in [0, 1]
        if output_type == "pt":
            out = video
        else:
            arr = video.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, F, H, W, 1)
            out = arr if output_type == "np" else [to_pil_frames(v) for v in arr]
        self.maybe_free_model_hooks()
        return VideoDigitsPipelineOutput(frames=out) if return_dict else (out,)


def to_pil_frames(video: np.ndarray) -> list:
    """(F, H, W[, 1]) in [0, 1] -> list of 8-bit grayscale PIL frames."""
    a = (np.clip(np.asarray(video, dtype=np.float64), 0, 1) * 255).round().astype(np.uint8)
    a = a[..., 0] if a.ndim == 4 else a
    return [Image.fromarray(f, "L") for f in a]


def is_video_digits_folder(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_video_digits_pipeline(pipe: VideoDigitsPipeline, path: str | Path, metadata: dict | None = None) -> None:
    save_pipeline_folder(pipe, path, MARKER, 'VideoDigitsPipeline', metadata)


def load_video_digits_pipeline(path: str | Path | None = None,
                               torch_dtype: torch.dtype = torch.float32) -> VideoDigitsPipeline:
    """Load the bundled video model (default) or a folder written by ``save_video_digits_pipeline``. Offline."""
    path = Path(path) if path is not None else BUNDLED_VIDEO_DIR
    if not is_video_digits_folder(path):
        raise ValueError(f"{path} is not a video-digits folder (no {MARKER}); train one with "
                         f"`compactfusion train-video-digits --out DIR`")
    transformer = WanTransformer3DModel.from_pretrained(path / "transformer", torch_dtype=torch_dtype)
    embedder = VideoDigitsLabelEmbedder.from_pretrained(path / "label_embedder", torch_dtype=torch_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    return VideoDigitsPipeline(transformer=transformer.eval(), label_embedder=embedder.eval(), scheduler=scheduler)


def build_video_digits_pipeline(seed: int = 0) -> VideoDigitsPipeline:
    """A fresh, untrained pipeline with the bundled architecture (for training and for tests)."""
    torch.manual_seed(seed)
    return VideoDigitsPipeline(transformer=WanTransformer3DModel(**transformer_config()),
                               label_embedder=VideoDigitsLabelEmbedder(), scheduler=FlowMatchEulerDiscreteScheduler())
