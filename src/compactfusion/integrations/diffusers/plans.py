"""Sharding plans: where a transformer's token inputs are split over the ranks and where its output is gathered.

A plan has the form of diffusers' ``_cp_plan`` (``diffusers/models/_modeling_parallel.py``), as data:

    {"": {"hidden_states": Split(1, 3), "encoder_hidden_states": Split(1, 3)},   # the transformer's inputs
     "rope": {0: Split(1, 4), 1: Split(1, 4)},                                   # outputs 0 and 1 of `rope`
     "transformer_blocks.*": {"encoder_hidden_states_mask": Split(1, 2)},        # every block's input
     "proj_out": Gather(1, 3)}                                                   # gather this output

Keys are module paths below the transformer (``""`` is the transformer itself, ``*`` matches every child
of a ``ModuleList``); inner keys are forward-argument names (split that input; lists/tuples of tensors
are split element by element, e.g. ControlNet block residuals) or output indices (split that output).
Unlike diffusers' hooks, a tensor whose number of dimensions differs from the plan's raises — a split
that is silently skipped leaves a rank computing on the wrong tokens — unless the entry says
``optional=True`` (e.g. Wan's ``timestep`` is per token only in Wan 2.2 TI2V). Splits may be uneven:
the first ``S % W`` ranks hold one token more (``compactfusion.parallel.shard_sizes``).

Text is kept whole on every rank in every family (``joint``), unlike diffusers' plans, which shard it:
sharded text K/V travel residual-coded next to image tokens whose statistics differ, and on the bundled
model that costs 6-8 dB PSNR under binary/int2 coding for ~1 % fewer bytes (docs/models.md, measured by
``compactfusion bench text``). A user plan may still split text (attention is exact either way: it is
invariant to the order of its keys).

Replicated text (``joint="front"|"rear"``: the unsplit tokens that each
self-attention call joins to the sharded ones, counted by ``joint_tokens``): they are attended exactly
once and never travel, and a key-padding mask on them is applied locally (HunyuanVideo).

``cross_attention`` names attention modules whose tokens are not split (text cross-attention, a text
refiner that runs on the whole text): they run locally. Every other attention module called between the first split and the gather is
self-attention over sharded tokens and must route each of its attention calls to the parallel context.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Union

__all__ = ["Split", "Gather", "FamilyPlan", "Stages", "PLANS", "plan_for", "from_diffusers_plan", "unwrap_model",
           "check_plan"]


@dataclass(frozen=True)
class Split:
    """Split a tensor along ``dim`` (it must have ``ndim`` dimensions; ``optional``: leave other ranks' shapes)."""

    dim: int
    ndim: int
    optional: bool = False
    mask: bool = False  # an attention mask over the split tokens: only one that masks nothing can be split


@dataclass(frozen=True)
class Gather:
    """All-gather a module's output (or output ``index`` of a tuple) along ``dim``."""

    dim: int
    ndim: int
    index: Union[int, None] = None


PlanEntry = Union[Mapping, Gather]


@dataclass(frozen=True)
class Stages:
    """Where ``strategy="pipefusion"`` may cut a model into pipeline stages.

    ``blocks``: the block lists (``ModuleList`` paths) in execution order; ``carry``: the block inputs that
    hold the running state from block to block (they travel between stages); ``returns``: the carried
    inputs in the order a block returns them (one tuple for every list, or ``{list path: tuple}``);
    ``text``: the model inputs that hold the joint text tokens, with their token dimension — what a patch
    pass without text (``pipefusion_text="first"``) cuts to zero tokens; () = the text rides every pass.
    """

    blocks: tuple
    carry: tuple
    returns: Union[tuple, Mapping] = ()
    text: Union[tuple, Mapping] = ()

    def returns_of(self, path: str) -> tuple:
        r = self.returns.get(path, ()) if isinstance(self.returns, Mapping) else self.returns
        return tuple(r) or tuple(self.carry)


@dataclass(frozen=True)
class FamilyPlan:
    """A family's plan plus what the hooks need beyond it."""

    name: str
    plan: Mapping[str, PlanEntry]
    cross_attention: tuple = ()  # fnmatch patterns of module paths that attend to unsplit context
    batch_args: tuple = ()       # inputs whose dim 0 is the (CFG-doubled) batch; () = every tensor input
    joint: Union[str, None] = None  # "front"/"rear": replicated (unsplit) tokens joined to self-attention calls
    joint_tokens: tuple = ("encoder_hidden_states",)  # the inputs whose dim-1 sizes add up to those tokens
    notes: str = ""
    families: tuple = field(default=())  # class names this plan is for
    stages: Union[Stages, None] = None  # pipeline cut points (strategy="pipefusion"); None = not supported


def check_plan(plan: Mapping, where: str = "plan") -> None:
    """Structural validation with messages that say what to fix (user plans go through this too)."""
    if not isinstance(plan, Mapping) or not plan:
        raise TypeError(f"{where} must be a non-empty dict {{module path: {{argument: Split}} or Gather}}, got "
                        f"{type(plan).__name__}")
    gathers = 0
    for path, entry in plan.items():
        if not isinstance(path, str):
            raise TypeError(f"{where}: module paths must be strings ('' for the transformer), got {path!r}")
        if isinstance(entry, Gather):
            gathers += 1
            continue
        if not isinstance(entry, Mapping) or not entry:
            raise TypeError(f"{where}[{path!r}] must be Gather(dim, ndim) or a non-empty dict of Split entries")
        for name, split in entry.items():
            if not isinstance(name, (str, int)) or isinstance(name, bool):
                raise TypeError(f"{where}[{path!r}]: keys are argument names or output indices, got {name!r}")
            if not isinstance(split, Split):
                raise TypeError(f"{where}[{path!r}][{name!r}] must be a Split(dim, ndim), got {split!r}")
            if not (0 <= split.dim < split.ndim) and not (-split.ndim <= split.dim < 0):
                raise ValueError(f"{where}[{path!r}][{name!r}]: dim {split.dim} is outside a {split.ndim}-D tensor")
    if gathers == 0:
        raise ValueError(f"{where} has no Gather entry: the output would stay split across ranks")


def from_diffusers_plan(cp_plan: Mapping) -> dict:
    """Our plan from a diffusers ``_cp_plan`` (ContextParallelInput/Output objects, read by attribute)."""
    out: dict = {}
    for path, entry in cp_plan.items():
        if isinstance(entry, Mapping):
            conv = {}
            for name, cpi in entry.items():
                if isinstance(cpi, (list, tuple)):
                    raise ValueError(f"_cp_plan[{path!r}][{name!r}]: per-element plans are not supported; pass "
                                     f"ParallelConfig(plan=...) for this model")
                if isinstance(name, int) != bool(getattr(cpi, "split_output", False)):
                    raise ValueError(f"_cp_plan[{path!r}][{name!r}]: output splits need integer keys")
                conv[name] = Split(int(cpi.split_dim), int(cpi.expected_dims))
            out[path] = conv
        else:
            outs = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            if len(outs) != 1:
                raise ValueError(f"_cp_plan[{path!r}]: gathering several outputs is not supported")
            out[path] = Gather(int(outs[0].gather_dim), int(outs[0].expected_dims))
    return out


def _flux_plan() -> dict:
    # diffusers' Flux plan with the text left whole (joint, front), plus ControlNet residuals (added to the
    # image tokens in every block).
    return {"": {"hidden_states": Split(1, 3), "img_ids": Split(0, 2), "controlnet_block_samples": Split(1, 3),
                 "controlnet_single_block_samples": Split(1, 3)},
            "proj_out": Gather(1, 3)}


_PLANS = [
    FamilyPlan("flux", _flux_plan(), joint="front", families=("FluxTransformer2DModel",),
               notes="FLUX.1 (dev, schnell, Kontext, Fill) and the bundled digits model",
               stages=Stages(("transformer_blocks", "single_transformer_blocks"),
                             carry=("hidden_states", "encoder_hidden_states"),
                             returns=("encoder_hidden_states", "hidden_states"),
                             text={"encoder_hidden_states": -2, "txt_ids": -2})),
    FamilyPlan("flux2", {"": {"hidden_states": Split(1, 3), "img_ids": Split(1, 3)}, "proj_out": Gather(1, 3)},
               joint="front", families=("Flux2Transformer2DModel",)),
    FamilyPlan("qwenimage", {"": {"controlnet_block_samples": Split(1, 3)},
                             "transformer_blocks.0": {"hidden_states": Split(1, 3)},
                             "transformer_blocks.*": {"modulate_index": Split(1, 2)},
                             "pos_embed": {0: Split(0, 2)},  # (image rotary, text rotary): the text stays whole
                             "proj_out": Gather(1, 3)}, joint="front", families=("QwenImageTransformer2DModel",),
               notes="text whole at the front: its padding mask is applied locally"),
    FamilyPlan("wan", {"rope": {0: Split(1, 4), 1: Split(1, 4)},
                       "blocks.0": {"hidden_states": Split(1, 3)},
                       "": {"timestep": Split(1, 2, optional=True)},  # per-token only in Wan 2.2 TI2V
                       "proj_out": Gather(1, 3)},
               cross_attention=("blocks.*.attn2",), families=("WanTransformer3DModel",),
               notes="text is a cross-attention context: replicated, never split",
               stages=Stages(("blocks",), carry=("hidden_states",))),
    FamilyPlan("ltx", {"": {"hidden_states": Split(1, 3), "timestep": Split(1, 2, optional=True)},
                       "rope": {0: Split(1, 3), 1: Split(1, 3)}, "proj_out": Gather(1, 3)},
               cross_attention=("transformer_blocks.*.attn2",), families=("LTXVideoTransformer3DModel",),
               notes="text is a masked cross-attention context: replicated; per-token timesteps split with the video"),
    FamilyPlan("cogvideox", {"": {"image_rotary_emb": Split(0, 2)},
                             "transformer_blocks.0": {"hidden_states": Split(1, 3)},
                             "proj_out": Gather(1, 3)}, joint="front", families=("CogVideoXTransformer3DModel",),
               notes="text and video are embedded together; split after the embedding, at the first block"),
    FamilyPlan("hunyuanvideo", {"x_embedder": {0: Split(1, 3)}, "rope": {0: Split(0, 2), 1: Split(0, 2)},
                                "proj_out": Gather(1, 3)},
               joint="rear", cross_attention=("context_embedder.*",),  # the text refiner attends to text only
               families=("HunyuanVideoTransformer3DModel",),
               notes="the token refiner needs the whole (padded) text, so text stays replicated at the rear of "
                     "every attention call; its padding mask is applied locally"),
    FamilyPlan("hunyuanvideo15", {"x_embedder": {0: Split(1, 3)}, "rope": {0: Split(0, 2), 1: Split(0, 2)},
                                  "proj_out": Gather(1, 3)},
               joint="rear", joint_tokens=("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds"),
               cross_attention=("context_embedder.*",), families=("HunyuanVideo15Transformer3DModel",),
               notes="condition tokens (text, glyph text, image) replicated at the rear; square padding mask applied "
                     "locally"),
    # SD3/SD3.5 and PixArt patch-embed an image: split the embedding's output, not the latent.
    FamilyPlan("sd3", {"pos_embed": {0: Split(1, 3)}, "proj_out": Gather(1, 3)}, joint="rear",
               families=("SD3Transformer2DModel",),
               notes="joint attention over [image, text]; SD3.5's second (image-only) attention is routed too",
               stages=Stages(("transformer_blocks",), carry=("hidden_states", "encoder_hidden_states"),
                             returns=("encoder_hidden_states", "hidden_states"), text={"encoder_hidden_states": -2})),
    FamilyPlan("pixart", {"pos_embed": {0: Split(1, 3)}, "proj_out": Gather(1, 3)},
               cross_attention=("transformer_blocks.*.attn2",), families=("PixArtTransformer2DModel",),
               notes="PixArt-alpha and -sigma; text enters by cross-attention only"),
]


def _table(plans) -> Mapping[str, FamilyPlan]:
    table = {}
    for fp in plans:
        if not fp.families:
            continue
        check_plan(fp.plan, f"plan {fp.name!r}")
        for cls in fp.families:
            table[cls] = fp
    return MappingProxyType(table)


PLANS = _table(_PLANS)


def unwrap_model(module):
    """The module under torch.compile's wrapper (``OptimizedModule._orig_mod``), so detection never reads it."""
    while hasattr(module, "_orig_mod"):
        module = module._orig_mod
    return module


def plan_for(transformer, user_plan=None) -> FamilyPlan:
    """The plan for ``transformer``: the user's, else our table by class, else the class's diffusers ``_cp_plan``."""
    model = unwrap_model(transformer)
    cls = type(model).__name__
    if user_plan is not None:
        if isinstance(user_plan, FamilyPlan):
            check_plan(user_plan.plan, "plan")
            return user_plan
        check_plan(user_plan, "plan")
        return FamilyPlan(f"user:{cls}", user_plan, cross_attention=_cross_default(model))
    for klass in type(model).__mro__:
        if klass.__name__ in PLANS:
            return PLANS[klass.__name__]
    cp = getattr(type(model), "_cp_plan", None)
    if cp:
        plan = from_diffusers_plan(cp)
        check_plan(plan, f"{cls}._cp_plan")
        return FamilyPlan(f"diffusers:{cls}", plan, cross_attention=_cross_default(model))
    supported = ", ".join(sorted(PLANS))
    raise ValueError(f"compactfusion cannot parallelize {cls}: it has no sharding plan; pass one with ParallelConfig(plan={{...}}) "
                     f"(see compactfusion.integrations.diffusers.plans); built-in plans: {supported}")


def _cross_default(model) -> tuple:
    """Attention modules that declare themselves cross-attention (diffusers' ``is_cross_attention``)."""
    return tuple(name for name, m in model.named_modules() if getattr(m, "is_cross_attention", False) and name)


def resolve_paths(model, path: str) -> list[tuple[str, object]]:
    """``[(name, module)]`` for a plan path; ``*`` matches any child name. Raises when nothing matches."""
    if path == "":
        return [("", model)]
    if "*" not in path:
        try:
            return [(path, model.get_submodule(path))]
        except AttributeError:
            raise ValueError(f"plan path {path!r} names no module of {type(model).__name__}") from None
    found = [(n, m) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, path)
             and n.count(".") == path.count(".")]
    if not found:
        raise ValueError(f"plan path {path!r} matches no module of {type(model).__name__}")
    return found


def is_cross_attention(plan: FamilyPlan, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in plan.cross_attention)
