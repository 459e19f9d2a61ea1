"""``codec="auto"``: per layer, the codec with the lowest predicted time, never coarser than a floor.

Predicted time of one op for a candidate ``spec`` on a per-rank stream of shape ``(N, C)``:

    encode_s + decodes * decode_s + LinkModel(bandwidth, latency).op_cost([nbytes] * messages)

(times ``encodes`` for the encode term) where ``nbytes`` is the codec's own ``encoded_nbytes(N, C)`` (``"none"``: the raw tensor) and the link
cost is :class:`~compactfusion.comm.LinkModel`'s formula (the one place it lives). ``messages`` is
how many times the payload goes on the wire per op (``W - 1`` for ring and all-gather), ``decodes``
how many payloads a rank decodes (``W - 1`` too). Uncompressed costs no coding.

Fidelity floor: a candidate is allowed when it keeps at least as many bits per element at this shape
as the floor codec (``floor="int2"``: int2, int4, int8, fp16, ... and ``"none"``; binary and low-rank
excluded). Ties go to the finer codec, so on an infinitely fast link ``"none"`` wins, and with
``margin`` a codec must beat uncompressed by that fraction to be chosen (guards against timing noise).

:func:`choose_codec` is pure (the timings come in through ``coding_time_fn``);
:func:`measure_coding_times` times one send and one receive of a residual stream at the actual shape
(the coder's fixed per-call work included: an uncompressed layer skips the coder, see
:meth:`AutoPlan.raw_layer`) and :func:`agreed_coding_times` makes the result identical on every rank, which the
choice must be. :class:`AutoPlan` keeps the per-layer choices as a ``CompressionConfig.plan``.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from ..codecs import get_codec
from ..comm import LinkModel
from ..comm.probe import agree_max, probe_link

__all__ = ["Choice", "choose_codec", "measure_coding_times", "agreed_coding_times", "bits_per_element",
           "AutoPlan", "AutoController", "UNCOMPRESSED", "auto_compression", "controller_for", "stream_traffic",
           "ensure_attention"]

UNCOMPRESSED = "none"
CodingTimeFn = Callable[[str, tuple, torch.dtype], "tuple[float, float]"]


class Choice(NamedTuple):
    spec: str
    predicted_s: float
    table: dict  # {spec: predicted seconds} for every allowed candidate (for stats)


def _raw_nbytes(n: int, c: int, dtype: torch.dtype) -> int:
    return n * c * torch.empty((), dtype=dtype).element_size()


def wire_nbytes(spec: str, shape: tuple, dtype: torch.dtype) -> int:
    n, c = int(shape[0]), int(shape[1])
    return _raw_nbytes(n, c, dtype) if spec == UNCOMPRESSED else get_codec(spec).encoded_nbytes(n, c)


def bits_per_element(spec: str, shape: tuple, dtype: torch.dtype) -> float:
    n, c = int(shape[0]), int(shape[1])
    return 8.0 * wire_nbytes(spec, shape, dtype) / (n * c)


def _check_shape(shape) -> tuple[int, int]:
    if len(shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be a per-rank stream shape (N, C) of positive ints, got {shape!r}")
    return int(shape[0]), int(shape[1])


def choose_codec(candidates: Sequence[str], shape: tuple, dtype: torch.dtype, bandwidth_Bps: float, latency_s: float,
                 coding_time_fn: CodingTimeFn, floor: str | None = None, *, messages: int = 1,
                 decodes: int | None = None, encodes: int = 1, margin: float = 0.0) -> Choice:
    """The cheapest allowed candidate for one layer (see the module docstring). ``"none"`` is always a
    candidate. ``coding_time_fn(spec, shape, dtype) -> (encode_s, decode_s)``. ``encodes`` counts the
    payloads a rank encodes per op (1 for ring/all-gather, ``W - 1`` chunks for Ulysses)."""
    shape = _check_shape(shape)
    if floor is not None and floor != UNCOMPRESSED:
        get_codec(floor)  # validates the spec (ValueError lists the valid ones)
    if not (0.0 <= margin < 1.0):
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if isinstance(messages, bool) or not isinstance(messages, int) or messages < 0:
        raise ValueError(f"messages must be an integer >= 0, got {messages!r}")
    decodes = messages if decodes is None else int(decodes)
    link = LinkModel(bandwidth=bandwidth_Bps, latency=latency_s, mode="virtual")  # validates both numbers
    need = 0.0 if floor is None else bits_per_element(floor, shape, dtype)
    specs = list(dict.fromkeys([UNCOMPRESSED, *candidates]))
    table: dict[str, float] = {}
    for spec in specs:
        if spec != UNCOMPRESSED and bits_per_element(spec, shape, dtype) < need:
            continue  # coarser than the floor
        enc, dec = (0.0, 0.0) if spec == UNCOMPRESSED else coding_time_fn(spec, shape, dtype)
        if not all(math.isfinite(t) and t >= 0 for t in (enc, dec)):
            raise ValueError(f"coding_time_fn gave ({enc!r}, {dec!r}) s for {spec!r}; need finite times >= 0")
        table[spec] = encodes * enc + decodes * dec + link.op_cost([wire_nbytes(spec, shape, dtype)] * messages)

    def key(spec: str):  # predicted time (compressed ones handicapped by margin), then finer first
        t = table[spec] if spec == UNCOMPRESSED else table[spec] / (1.0 - margin)
        return (t, -bits_per_element(spec, shape, dtype))
    best = min(table, key=key)
    return Choice(best, table[best], table)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_coding_times(specs: Iterable[str], shape: tuple, dtype: torch.dtype, device: torch.device | str = "cpu",
                         reps: int = 3, seed: int = 0, config=None) -> dict[str, tuple[float, float]]:
    """Median ``(encode_s, decode_s)`` per codec at ``shape``/``dtype``/``device``, as the residual path
    runs them per stream and step: ``ResidualEncoder.encode_with_reconstruction`` (finiteness check,
    prediction, fused ``x - pred`` + encode, the sender's own reconstruction and state update) and
    ``ResidualDecoder.decode`` (size check, fused decode + add, state update). At small shapes those
    fixed per-call costs are as large as the codec's own work, and an uncompressed layer pays none of
    them (it bypasses the coder), so timing the codec alone would favour compression. ``config``: the
    run's ``CompressionConfig`` (residual order, error feedback, state dtype); its codec, plan and
    warmup are replaced per candidate."""
    import dataclasses

    from ..residual import CompressionConfig, ResidualDecoder, ResidualEncoder
    n, c = _check_shape(shape)
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn(n, c, generator=g)
    xs = [(base + 0.1 * torch.randn(n, c, generator=g)).to(device=device, dtype=dtype) for _ in range(reps + 1)]
    out: dict[str, tuple[float, float]] = {}
    for spec in dict.fromkeys(specs):
        if spec == UNCOMPRESSED:
            out[spec] = (0.0, 0.0)
            continue
        get_codec(spec)  # validates the spec (ValueError lists the valid ones)
        cfg = dataclasses.replace(config, codec=spec, plan=None, warmup_steps=0, warmup_codec=None) \
            if config is not None else CompressionConfig(codec=spec, warmup_steps=0)
        enc, dec = ResidualEncoder(cfg), ResidualDecoder(cfg)
        enc_t, dec_t = [], []
        for i, x in enumerate(xs):  # step 0 warms caches / kernels (and codes against a zero prediction)
            _sync(device)
            t0 = time.perf_counter()
            payload, _ = enc.encode_with_reconstruction("probe", x, i)
            _sync(device)
            t1 = time.perf_counter()
            dec.decode("probe", payload, i, (n, c), dtype)
            _sync(device)
            t2 = time.perf_counter()
            if i:
                enc_t.append(t1 - t0)
                dec_t.append(t2 - t1)
        out[spec] = (sorted(enc_t)[len(enc_t) // 2], sorted(dec_t)[len(dec_t) // 2])
    return out


def agreed_coding_times(comm, times: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The slowest rank's times per codec, identical on every member of ``comm`` (every rank must pass
    the same specs in the same order)."""
    specs = list(times)
    flat = agree_max(comm, [t for s in specs for t in times[s]])
    return {s: (flat[2 * i], flat[2 * i + 1]) for i, s in enumerate(specs)}


class AutoPlan:
    """A ``CompressionConfig.plan`` whose per-layer codec is chosen once per layer by :meth:`decide`.

    Until a layer is decided it is sent uncompressed (never slower than today's default). Call
    :meth:`decide` on every rank with agreed numbers (:func:`agreed_coding_times`,
    :func:`~compactfusion.comm.probe.probe_link`), so every rank's plan stays identical.
    """

    def __init__(self, candidates: Sequence[str], floor: str | None = None, margin: float = 0.05):
        for spec in candidates:
            if spec != UNCOMPRESSED:
                get_codec(spec)
        self.candidates = tuple(dict.fromkeys(candidates))
        self.floor, self.margin = floor, float(margin)
        self.choices: dict[int, Choice] = {}
        self._shapes: dict[int, tuple] = {}
        self.__name__ = f"auto({','.join(self.candidates)}; floor={floor})"

    def __call__(self, layer: int, step: int) -> str:
        c = self.choices.get(layer)
        return UNCOMPRESSED if c is None else c.spec

    def decided(self, layer: int) -> bool:
        return layer in self.choices

    def raw_layer(self, layer: int) -> bool:
        """True when ``layer`` is sent uncompressed at every step (chosen "none", or not decided yet): the
        stream coder then sends its raw bytes and keeps no residual state for it, so an uncompressed
        choice costs exactly what an uncompressed run costs. A layer is decided before its first
        attention call of a generation and stays so for the whole generation (its shape cannot change
        within one), identically on every rank."""
        return self(layer, 0) == UNCOMPRESSED

    def decide(self, layer: int, shape: tuple, dtype: torch.dtype, bandwidth_Bps: float, latency_s: float,
               coding_times: dict[str, tuple[float, float]], *, messages: int = 1, encodes: int = 1) -> Choice:
        def fn(spec, shp, dt):
            return coding_times[spec]
        choice = choose_codec(self.candidates, shape, dtype, bandwidth_Bps, latency_s, fn, self.floor,
                              messages=messages, encodes=encodes, margin=self.margin)
        self.choices[layer] = choice
        self._shapes[layer] = (tuple(shape), str(dtype))
        return choice

    def decided_for(self, layer: int, shape: tuple, dtype: torch.dtype) -> bool:
        """True when ``layer`` was decided for this very stream shape and dtype."""
        return self._shapes.get(layer) == (tuple(shape), str(dtype))

    def stats(self) -> dict:
        """JSON-safe ``{layer: {"codec", "predicted_s", "candidates_s"}}`` for ``cf.stats``."""
        return {int(l): {"codec": c.spec, "predicted_s": c.predicted_s, "candidates_s": dict(c.table)}
                for l, c in sorted(self.choices.items())}

    def reset(self) -> None:
        self.choices.clear()
        self._shapes.clear()


class AutoController:
    """Drives an :class:`AutoPlan` from inside a parallel context (collective, like every comm op).

    ``comm`` should be the context's *world* communicator: decisions are then identical on every rank
    (CFG halves included), so configuration fingerprints, which sample the plan, still agree. The link
    is measured once, lazily, by the first :meth:`ensure` (a short :func:`probe_link` on the payload's
    device); with a ``virtual`` link model the model's own numbers are used instead, since modelled
    time is what such a run reports. Codecs are timed once per stream shape (all ranks agree on the
    slowest rank's times); each layer then costs one pure decision.
    """

    def __init__(self, plan: AutoPlan, comm, *, reps: int = 3, probe_kwargs: dict | None = None, config=None):
        self.plan, self.comm, self.reps, self.config = plan, comm, int(reps), config
        self.probe_kwargs = dict(probe_kwargs or {})
        self.link: tuple[float, float] | None = None  # (bandwidth B/s, latency s), agreed
        self._times: dict[tuple, dict] = {}  # (shape, dtype, device) -> agreed coding times

    def _link(self, device: torch.device) -> tuple[float, float]:
        if self.link is None:
            model = self.comm.link
            if model.mode == "virtual":
                self.link = (model.bandwidth, model.latency)
            else:
                est = probe_link(self.comm, device=device, **self.probe_kwargs)
                self.link = (est.bandwidth_Bps, est.latency_s)
        return self.link

    def ensure(self, layer: int, shape: tuple, dtype: torch.dtype, device: torch.device | str, *,
               messages: int, encodes: int = 1) -> Choice:
        """Decide ``layer`` unless it was decided for this shape; every rank must call it for the same
        layers in the same order. ``shape`` is the per-message stream shape ``(N, C)``."""
        if self.plan.decided_for(layer, shape, dtype):
            return self.plan.choices[layer]
        device = torch.device(device)
        bw, lat = self._link(device)
        key = (tuple(shape), str(dtype), str(device))
        times = self._times.get(key)
        if times is None:  # layers of one model mostly share a shape: time each shape once
            times = measure_coding_times(self.plan.candidates, shape, dtype, device, reps=self.reps, config=self.config)
            times = self._times[key] = agreed_coding_times(self.comm, times)
        return self.plan.decide(layer, shape, dtype, bw, lat, times, messages=messages, encodes=encodes)


# ---- wiring into a ParallelContext ---------------------------------------------------------------

def auto_compression(candidates: Sequence[str] = ("binary", "int2", "int4"), floor: str | None = None,
                     margin: float = 0.05, **kw):
    """A ``CompressionConfig`` whose plan is an :class:`AutoPlan` (what ``codec="auto"`` means): warm-up,
    residual order and the other fields as usual (``**kw``); ``codec`` is nominal (the plan decides)."""
    from ..residual import CompressionConfig
    cands = tuple(candidates)
    if not cands:
        raise ValueError("codec='auto' needs at least one candidate codec, e.g. ('binary', 'int2', 'int4')")
    return CompressionConfig(codec=cands[0], plan=AutoPlan(cands, floor=floor, margin=margin), **kw)


def controller_for(ctx) -> AutoController | None:
    """The controller for a ParallelContext whose compression plan is an :class:`AutoPlan`, else None."""
    comp = ctx.config.compression
    plan = getattr(comp, "plan", None)
    if not isinstance(plan, AutoPlan) or ctx.seq_world == 1:
        return None
    return AutoController(plan, ctx.world_comm, config=comp)


def stream_traffic(strategy: str, q_shape: tuple, ulysses: int, seq_world: int) -> tuple[tuple[int, int], int, int]:
    """``((N, C), messages, encodes)`` per attention call and rank for a strategy's coded streams.

    Ring / all-gather strategies send one (B*S_local, H*D) payload ``W - 1`` times; Ulysses sends
    ``U - 1`` head chunks (B*S_local, H/U*D), each encoded on its own. USP is charged as its Ulysses
    phase (the ring phase moves the same codec's payloads, so the ranking barely changes)."""
    b, s, h, d = (int(x) for x in q_shape)
    if strategy in ("ulysses", "usp") and ulysses > 1:
        return (b * s, (h // ulysses) * d), ulysses - 1, ulysses - 1
    return (b * s, h * d), seq_world - 1, 1


def ensure_attention(ctx, controller: AutoController, q: torch.Tensor, layer: int) -> Choice:
    """Call from ``ParallelContext.attention`` before the strategy runs (every rank, every layer): decides
    ``layer``'s codec on its first call (and after a shape change), a no-op afterwards."""
    shape, messages, encodes = stream_traffic(ctx.config.strategy, tuple(q.shape), ctx.mesh.ulysses, ctx.seq_world)
    return controller.ensure(layer, shape, q.dtype, q.device, messages=messages, encodes=encodes)
