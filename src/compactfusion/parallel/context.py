"""``ParallelContext``: one per pipeline (per rank), owning groups, residual state, buffers and the ledger.

Nothing lives at module level: two contexts in one process are independent, and ``reset()`` starts a
new generation (residual coders, DistriFusion buffers, per-layer shape caches and the ledger).

Mesh: ``cfg x ulysses x ring``, row-major with the ring innermost, so global rank
``g = (c * U + u) * R + r``. The sequence-parallel (SP) group of a rank is its CFG half,
``[c * SP, (c + 1) * SP)``, and its sequence rank is ``u * R + r`` (the SP group order).

Consistency mode (``check_consistency_every = K > 0``): the first attention call of step ``t`` with
``t > 0`` and ``t % K == 0`` first checks every stream's state as it stood after step ``t - 1`` (all
layers of that step are done by then). The state after the very last step is not checked automatically;
call :meth:`ParallelContext.check_consistency` yourself after the loop if you want it.

Branches: ``attention(..., branch=b)`` keeps separate residual streams and strategy buffers per branch
(a hashable name; ``None`` is the default branch). The diffusers integration uses one branch per
transformer call within a denoising step (conditional, unconditional, skip-layer, ...) and per request of
a batch, so no stream is ever coded against another branch's activations.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..comm import ByteLedger, Communicator, make_mesh_groups
from .config import Mesh, ParallelConfig
from .errors import CommError, ConfigMismatchError, ConsistencyError, ShapeMismatchError
from .auto import controller_for, ensure_attention
from .registry import REGISTRY, build_strategy
from .sharding import shard_offsets, shard_sizes
from .streams import StreamCoder, from_bytes, to_bytes

__all__ = ["ParallelContext", "Joint"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Joint(NamedTuple):
    """Replicated tokens (e.g. Flux text) present on every rank: (B, T, H, D) each."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def _check_int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {x!r}")
    return x


def _check_inputs(q, k, v, joint: Joint | None, layer: int, step: int) -> None:
    where = f"attention(layer={layer}, step={step})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{where}: {name} must be (B, S_local, H, D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{where}: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{where}: q, k, v must have the same (B, S_local, H, D) shape, got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError(f"{where}: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                        f"{q.device}/{k.device}/{v.device}")
    if joint is None:
        return
    b, _, h, d = q.shape
    for name, t in zip(("joint_q", "joint_k", "joint_v"), joint):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{where}: {name} must be a (B, T, H, D) tensor")
        if (t.shape[0], t.shape[2], t.shape[3]) != (b, h, d) or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{where}: {name} {tuple(t.shape)} {t.dtype} must match q's batch {b}, heads {h}, "
                             f"head dim {d}, dtype {q.dtype} and device")
    if joint.k.shape != joint.v.shape or joint.k.shape[0] != joint.q.shape[0]:
        # joint_k/v may hold fewer tokens than joint_q (padding keys left out), never different ones
        raise ValueError(f"{where}: joint_k and joint_v must have the same shape and joint_q's batch")


class ParallelContext:
    """Parallel attention for one pipeline on this rank (collective construction: all ranks build it).

    ``attention(q, k, v, layer, step[, joint_q, joint_k, joint_v])`` runs the configured strategy on local
    shards ``(B, S_local, H, D)`` and returns this rank's output rows (and the joint tokens' output).
    """

    def __init__(self, config: ParallelConfig, group: Any = None):
        if not isinstance(config, ParallelConfig):
            raise TypeError(f"config must be a ParallelConfig, got {type(config).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("ParallelContext needs torch.distributed initialised first "
                               "(dist.init_process_group), even for a single process")
        if group is not None and group is not dist.group.WORLD:
            raise ValueError("ParallelContext builds its cfg x ulysses x ring mesh over the default (WORLD) group; "
                             "pass group=None and start one process group per pipeline")
        self.config = config
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.mesh: Mesh = config.resolve(self.world)
        m = self.mesh
        self.ledger = ByteLedger()
        t = config.timeout_s

        groups = make_mesh_groups(self.world, {"cfg": m.cfg, "ulysses": m.ulysses, "ring": m.ring}, timeout_s=t)

        def comm(mg):
            return Communicator(mg.group, config.link, self.ledger, t, ranks=mg.ranks, owns_group=True)

        self.cfg_comm = comm(groups["cfg"])
        self.ulysses_comm = comm(groups["ulysses"])
        self.ring_comm = comm(groups["ring"])
        self.world_comm = Communicator(None, config.link, self.ledger, t)
        if m.ulysses > 1 and m.ring > 1:  # usp: the SP group is neither dimension alone
            self.sp_comm = None
            for c in range(m.cfg):  # new_group is collective over WORLD: every rank creates every group
                sub = self.world_comm.subgroup(range(c * m.sp, (c + 1) * m.sp))
                if sub is not None:
                    self.sp_comm = sub
        else:
            self.sp_comm = self.ring_comm if m.ulysses == 1 else self.ulysses_comm

        self.cfg_rank, self.ulysses_rank, self.ring_rank = m.coords(self.rank)
        self.cfg_world, self.seq_world = m.cfg, m.sp
        self.seq_rank = self.ulysses_rank * m.ring + self.ring_rank
        # PipeFusion: the ring dimension holds the pipeline stages; the runtime sets ``patch`` per pass.
        self.pipeline = REGISTRY[config.strategy].mesh == "pipe"
        self.stages = m.ring if self.pipeline else 1
        self.stage = self.ring_rank if self.pipeline else 0
        self.num_patches = config.patches(m.ring) if self.pipeline else 1
        self.patch = None

        self._seq_lens: dict = {}  # (group name, branch, layer) -> (own shape signature, [S_local per member])
        self._current_step: int | None = None
        self._branches: dict = {}  # branch -> (StreamCoder, Strategy)
        self.branch = None
        self._select(None)
        # Cheap start-up agreement on the configuration itself (shapes can be added via check_agreement).
        self.check_agreement("")
        self.auto = controller_for(self)  # codec="auto": per-layer choices made on first use

    # -- attention ------------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, step: int,
                  joint_q: torch.Tensor | None = None, joint_k: torch.Tensor | None = None,
                  joint_v: torch.Tensor | None = None, branch=None):
        """Attention of the local queries over the whole (sequence-parallel) sequence.

        Returns ``out`` (B, S_local, H, D), or ``(out, joint_out)`` when joint tokens are given. Joint
        tokens are replicated on every rank: their K/V join this rank's local block (attended exactly
        once, never communicated) and their queries attend to everything.
        """
        _check_int(layer, "layer")
        _check_int(step, "step")
        given = [t is not None for t in (joint_q, joint_k, joint_v)]
        if any(given) and not all(given):
            raise ValueError(f"attention(layer={layer}, step={step}): pass all of joint_q, joint_k, joint_v or none")
        joint = Joint(joint_q, joint_k, joint_v) if all(given) else None
        _check_inputs(q, k, v, joint, layer, step)
        self._select(branch)
        if step != self._current_step:
            every = self.config.check_consistency_every
            if every and self._current_step is not None and step > 0 and step % every == 0:
                self.check_consistency(step - 1)
            self._current_step = step
        if self.auto is not None and not self.pipeline:  # pipefusion's K/V never travel
            ensure_attention(self, self.auto, q, layer)
        out, joint_out = self.strategy.attention(q, k, v, joint, layer, step)
        return out if joint is None else (out, joint_out)

    def use_branch(self, branch) -> None:
        """Make ``branch``'s coder and strategy current outside ``attention`` (pipefusion's stage transfers)."""
        self._select(branch)

    def _select(self, branch) -> None:
        """Make ``branch``'s stream coder and strategy instance the current ones (created on first use)."""
        pair = self._branches.get(branch)
        if pair is None:
            pair = self._branches[branch] = (StreamCoder(self.config.compression, self.config.tensors()),
                                             build_strategy(self.config.strategy, self))
        self.branch = branch
        self.coder, self.strategy = pair

    def finish_sends(self) -> None:
        """Wait for every branch's in-flight pipefusion boundary sends of this step (timeout-bounded)."""
        for _, strategy in self._branches.values():
            finish = getattr(strategy, "finish_step", None)
            if finish is not None:
                finish()

    @property
    def branches(self) -> list:
        """The branches seen since the last reset (the default branch first)."""
        return list(self._branches)

    # -- shapes ---------------------------------------------------------------------------------
    def seq_lens(self, comm: Communicator, name: str, layer: int, step: int, x: torch.Tensor) -> list[int]:
        """Every member's S_local for this layer (control all-gather once per layer per generation).

        Also checks that batch, heads, head dim and dtype agree across the members.
        """
        sig = (int(x.shape[0]), int(x.shape[1]), int(x.shape[2]), int(x.shape[3]), str(x.dtype))
        cached = self._seq_lens.get((name, self.branch, layer))
        if cached is not None:
            if cached[0] != sig:
                raise ShapeMismatchError(
                    f"attention(layer={layer}, step={step}): local shape {sig} differs from {cached[0]} seen earlier "
                    f"in this generation; shapes are exchanged once per layer, so call ParallelContext.reset() "
                    f"before changing resolution or batch")
            return cached[1]
        if comm.size == 1:
            lens = [sig[1]]
        else:
            try:
                sigs = comm.all_gather_object(sig)
            except CommError as e:  # name the attention call, not just the control op
                raise type(e)(f"{e} [while exchanging shard shapes for attention layer {layer}, step {step}]",
                              e.context) from e
            bad = [comm.ranks[i] for i, s in enumerate(sigs) if (s[0], s[2], s[3], s[4]) != (sig[0], sig[2], sig[3], sig[4])]
            if bad:
                table = ", ".join(f"rank {r}: (B={s[0]}, S={s[1]}, H={s[2]}, D={s[3]}, {s[4]})"
                                  for r, s in zip(comm.ranks, sigs))
                raise ShapeMismatchError(f"attention(layer={layer}, step={step}) on {name} group {list(comm.ranks)}: "
                                         f"batch, heads, head dim and dtype must agree across ranks; got {table}")
            lens = [s[1] for s in sigs]
        self._seq_lens[(name, self.branch, layer)] = (sig, lens)
        return lens

    # -- sequence / CFG helpers -----------------------------------------------------------------
    def patch_sizes(self, total: int) -> list[int]:
        """Tokens per PipeFusion patch for an image of ``total`` tokens (the same uneven rule as ranks)."""
        return shard_sizes(total, self.num_patches)

    def shard_sizes(self, total: int) -> list[int]:
        """Tokens per sequence rank for a sequence of ``total`` tokens (first ``total % W`` get one more)."""
        return shard_sizes(total, self.seq_world)

    def shard_seq(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a full sequence along ``dim`` (no communication)."""
        sizes = self.shard_sizes(x.shape[dim])
        return x.narrow(dim, shard_offsets(sizes)[self.seq_rank], sizes[self.seq_rank])

    def gather_seq(self, x: torch.Tensor, dim: int = 1, layer: int = -1, step: Any = None,
                   total: int | None = None) -> torch.Tensor:
        """All-gather local shards along ``dim`` over the sequence-parallel group (sizes may differ).

        With ``total`` every rank derives the sizes from the split rule; otherwise they are exchanged
        (control traffic). Recorded in the ledger as tensor "out".
        """
        comm = self.sp_comm
        dim = dim % x.ndim
        if comm.size == 1:
            return x
        if total is not None:
            lens = self.shard_sizes(total)
            if lens[self.seq_rank] != x.shape[dim]:
                raise ValueError(f"gather_seq: this rank holds {x.shape[dim]} tokens but the split of {total} gives "
                                 f"it {lens[self.seq_rank]}")
        else:
            shapes = comm.all_gather_object((tuple(x.shape), str(x.dtype)))
            mine = (tuple(x.shape), str(x.dtype))
            for r, (shp, dt) in zip(comm.ranks, shapes):
                if dt != mine[1] or len(shp) != x.ndim or any(a != b for i, (a, b) in enumerate(zip(shp, mine[0])) if i != dim):
                    raise ShapeMismatchError(f"gather_seq: rank {r} has {shp} {dt}, this rank {mine[0]} {mine[1]}; "
                                             f"only dim {dim} may differ")
            lens = [s[0][dim] for s in shapes]
        per_token = x.element_size()
        for i, n in enumerate(x.shape):
            if i != dim:
                per_token *= n
        xm = x.movedim(dim, 0).contiguous()
        sizes = [n * per_token for n in lens]
        parts = comm.all_gather_bytes(to_bytes(xm), sizes, layer=layer, step=step, tensor="out")
        rest = tuple(xm.shape[1:])
        full = torch.cat([xm if i == comm.rank else from_bytes(p, (lens[i],) + rest, x.dtype)
                          for i, p in enumerate(parts)], dim=0)
        return full.movedim(0, dim)

    def gather_cfg(self, x: torch.Tensor, dim: int = 0, step: Any = None) -> torch.Tensor:
        """Concatenate the CFG halves' tensors (equal shapes) along ``dim``, half 0 first.

        The shapes are compared first with a tiny control message: a size mismatch inside gloo would
        abort the process instead of raising.
        """
        comm = self.cfg_comm
        if comm.size == 1:
            return x
        sig = (tuple(x.shape), str(x.dtype))
        sigs = comm.all_gather_object(sig)
        if any(s != sig for s in sigs):
            raise ShapeMismatchError(f"gather_cfg: the CFG halves must pass equal shapes and dtypes, got "
                                     + ", ".join(f"rank {r}: {s}" for r, s in zip(comm.ranks, sigs)))
        parts = comm.all_gather_tensors(x.contiguous(), layer=-1, step=step, tensor="cfg_out")
        return torch.cat(parts, dim=dim)

    # -- state, checks, lifecycle ---------------------------------------------------------------
    def state_nbytes(self) -> int:
        """Persistent memory held between steps: residual states plus strategy buffers (DistriFusion)."""
        return sum(c.state_nbytes() + s.buffer_nbytes() for c, s in self._branches.values())

    def checksums(self) -> dict:
        """{stream key: checksum} of every residual stream state on this rank (sender and receiver sides).

        Keys of the default branch are the strategies' stream keys; other branches' are
        ``("branch", branch, key)``.
        """
        out = {}
        for b, (coder, _) in self._branches.items():
            for key, cs in coder.checksums().items():
                out[key if b is None else ("branch", b, key)] = cs
        return out

    def _holders(self, key) -> tuple[int, ...]:
        """Global ranks that keep a copy of stream ``key``'s state (the strategy that made the key knows)."""
        if key[0] == "branch":
            key = key[2]
        return self.strategy.holders(key)

    def check_consistency(self, step: Any = None) -> int:
        """Collective over all ranks: every copy of every stream state must be bitwise equal.

        Completes in-flight asynchronous transfers first (DistriFusion decodes them now instead of at
        their next use; the result is the same). Raises ``ConsistencyError`` naming the first stream that
        is missing on a holder or differs; returns the number of streams checked.
        """
        for _, strategy in self._branches.values():
            strategy.flush()
        tables = self.world_comm.all_gather_object(self.checksums())
        keys = sorted({k for t in tables for k in t}, key=repr)
        for key in keys:
            holders = self._holders(key)
            missing = [r for r in holders if key not in tables[r]]
            if missing:
                raise ConsistencyError(f"after step {step}: stream {key!r} has no state on rank(s) {missing} "
                                       f"(holders {list(holders)})", key, missing, step)
            vals = {r: tables[r][key] for r in holders}
            if len(set(vals.values())) > 1:
                raise ConsistencyError(f"after step {step}: stream {key!r} state differs between ranks: "
                                       + ", ".join(f"rank {r}: {v:#x}" for r, v in vals.items()), key,
                                       list(vals), step)
        return len(keys)

    def check_agreement(self, fingerprint: str = "") -> None:
        """Collective: all ranks must share this config (and ``fingerprint``, e.g. a hash of model shapes)."""
        mine = (self.config.fingerprint(), str(fingerprint))
        allv = self.world_comm.all_gather_object(mine)
        ref = allv[0]
        bad = [r for r, x in enumerate(allv) if x != ref]
        if bad:
            what = []
            if any(allv[r][0] != ref[0] for r in bad):
                what.append("parallel/compression configuration")
            if any(allv[r][1] != ref[1] for r in bad):
                what.append("fingerprint")
            raise ConfigMismatchError(f"ranks {bad} disagree with rank 0 on the {' and '.join(what)}: "
                                      + "; ".join(f"rank {r}: config {x[0]}, fingerprint {x[1][:40]!r}"
                                                  for r, x in enumerate(allv)), bad)

    def reset(self) -> None:
        """Start a new generation: residual coders, strategy buffers, shape caches and the ledger."""
        for coder, strategy in self._branches.values():
            strategy.reset()
            coder.reset()
        self._branches = {None: self._branches[None]}  # other branches are per generation
        self._select(None)
        self._seq_lens.clear()
        self._current_step = None
        self.patch = None
        self.ledger.reset()

    def summary(self) -> dict:
        return {"strategy": self.config.strategy, "world": self.world, "rank": self.rank,
                "mesh": {"cfg": self.mesh.cfg, "ulysses": self.mesh.ulysses, "ring": self.mesh.ring},
                "seq_rank": self.seq_rank, "cfg_rank": self.cfg_rank,
                "compressed_tensors": list(self.coder.tensors),
                "residual_state_nbytes": sum(c.state_nbytes() for c, _ in self._branches.values()),
                "buffer_nbytes": sum(s.buffer_nbytes() for _, s in self._branches.values()),
                "branches": len(self._branches),
                "auto": self.auto.plan.stats() if self.auto is not None else None,
                "streams": len(self.checksums()),
                "ledger": self.ledger.summary()}

    def close(self) -> None:
        """Release the groups this context created (optional; process exit does it too)."""
        for _, strategy in self._branches.values():
            strategy.reset()
        for c in {id(c): c for c in (self.cfg_comm, self.ulysses_comm, self.ring_comm, self.sp_comm)}.values():
            c.close()

    def __repr__(self) -> str:
        m = self.mesh
        return (f"ParallelContext(strategy={self.config.strategy!r}, rank={self.rank}/{self.world}, "
                f"mesh=cfg{m.cfg} x ulysses{m.ulysses} x ring{m.ring})")

