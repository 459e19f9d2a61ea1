"""Request validation (pydantic) with server-configured limits; a bad field is a 422 that names it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class Limits:
    """What a request may ask for (``compactfusion serve --max-*`` flags)."""
    max_n: int = 4
    max_steps: int = 100
    max_side: int = 2048
    max_prompt_chars: int = 2000
    default_steps: int = 20
    default_size: tuple[int, int] = (32, 32)  # (width, height)
    size_multiple: int = 2
    codecs: tuple[str, ...] = ("none",)
    default_codec: str = "none"
    negative_prompt: bool = False  # whether the pipeline takes one
    model_id: str = "compactfusion"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Job:
    """One admitted request, as the group sees it (plain data: it is broadcast as JSON)."""
    id: str
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    seed: int
    guidance_scale: float | None
    negative_prompt: str | None
    codec: str
    extra: dict = field(default_factory=dict)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (self.width, self.height, self.steps, self.codec, self.guidance_scale, self.negative_prompt)


def parse_size(value: str, limits: Limits) -> tuple[int, int]:
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size must look like 'WIDTHxHEIGHT' (e.g. '{limits.default_size[0]}x{limits.default_size[1]}'), "
                         f"got {value!r}")
    w, h = (int(p) for p in parts)
    m = limits.size_multiple
    for name, v in (("width", w), ("height", h)):
        if v <= 0 or v > limits.max_side:
            raise ValueError(f"{name} {v} must be between 1 and {limits.max_side} (server limit --max-size)")
        if v % m:
            raise ValueError(f"{name} {v} must be a multiple of {m} for this model")
    return w, h


def request_model(limits: Limits, check_prompt: Callable[[str], object] | None = None) -> type[BaseModel]:
    """The pydantic model of ``POST /v1/images/generations`` under ``limits``.

    OpenAI fields (``prompt``, ``n``, ``size``, ``response_format``, ``model``) plus ``seed``,
    ``num_inference_steps``, ``guidance_scale``, ``negative_prompt`` and ``codec`` (from the allow-list).
    Unknown OpenAI fields (``quality``, ``style``, ``user``) are ignored.
    """

    class ImageGenerationRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        prompt: str = Field(min_length=1, max_length=limits.max_prompt_chars)
        n: int = Field(1, ge=1, le=limits.max_n)
        size: str | None = None
        response_format: Literal["b64_json"] = "b64_json"
        model: str | None = None
        seed: int = Field(0, ge=0, lt=2**63)
        num_inference_steps: int = Field(limits.default_steps, ge=1, le=limits.max_steps)
        guidance_scale: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
        negative_prompt: str | None = Field(None, max_length=limits.max_prompt_chars)
        codec: str | None = None

        @field_validator("prompt")
        @classmethod
        def _prompt(cls, v: str) -> str:
            if check_prompt is not None:
                check_prompt(v)  # ValueError -> 422 naming "prompt"
            return v

        @field_validator("size")
        @classmethod
        def _size(cls, v: str | None) -> str | None:
            if v is not None:
                parse_size(v, limits)
            return v

        @field_validator("model")
        @classmethod
        def _model(cls, v: str | None) -> str | None:
            if v is not None and v != limits.model_id:
                raise ValueError(f"this server serves {limits.model_id!r}, not {v!r} (see GET /v1/models)")
            return v

        @field_validator("codec")
        @classmethod
        def _codec(cls, v: str | None) -> str | None:
            if v is not None and v not in limits.codecs:
                raise ValueError(f"codec {v!r} is not allowed on this server; allowed: {', '.join(limits.codecs)} "
                                 f"(server flag --allow-codecs)")
            return v

        @field_validator("negative_prompt")
        @classmethod
        def _negative(cls, v: str | None) -> str | None:
            if v is not None and not limits.negative_prompt:
                raise ValueError("this model takes no negative prompt; leave negative_prompt out")
            return v

    return ImageGenerationRequest


def to_job(req: BaseModel, limits: Limits, job_id: str) -> Job:
    w, h = parse_size(req.size, limits) if req.size else limits.default_size
    return Job(id=job_id, prompt=req.prompt, n=req.n, width=w, height=h, steps=req.num_inference_steps,
               seed=req.seed, guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt,
               codec=req.codec or limits.default_codec)
