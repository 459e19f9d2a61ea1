"""``Communicator``: the only path for bytes between ranks.

A Communicator wraps one process group and is owned by a parallel context (no module-level state).
Every op:

* is started asynchronously and waited with a deadline (``timeout_s``), so a dead, stuck or
  absent peer raises :class:`CommTimeoutError` instead of hanging; other backend failures raise
  :class:`CommError`. Both name the op, layer, step, tensor and group ranks. After either, the
  Communicator refuses further ops (the ranks' op sequences no longer line up, so a later op could
  silently pair with the wrong message);
* records the bytes this rank sends in the :class:`ByteLedger` when it starts (per receiving peer,
  by global rank), with the :class:`LinkModel` time of each message;
* with ``link.mode == "sleep"`` pads its real elapsed time (start to ``wait()`` return) up to the
  modelled time.

Every op, control ops included, is built from gloo point-to-point messages (``isend``/``irecv``
waited with ``Work.wait(timeout=...)``), never from gloo collectives: after a timed-out gloo
collective the backend's worker thread stays blocked and even interpreter exit waits for the group's
own timeout (30 min on a default WORLD), whereas a timed-out p2p op leaves nothing behind. It also
makes the wire bytes exactly the ledger's bytes (no padding). Note: gloo p2p work only reports
completion through ``wait()``; ``CommHandle.is_completed()`` may say False until then.

**Rules for callers.** Every op is collective over the Communicator's group: all members issue the
same ops in the same order (point-to-point ops included; their tags come from a per-Communicator
sequence number, so a skipped op times out instead of pairing with the wrong message). Sizes passed
in (``sizes``, ``recv_sizes``, ``recv_size``) must match what the peers really send: gloo *aborts
the process* (uncatchable ``SIGABRT``) when a message is larger than the posted receive. Construct
with ``check_sizes=True`` while debugging to verify them first with a small control all-gather.
Ranks in arguments (``sizes`` order, ``dst``, ``src``) are indices within the group
(``0..size-1``); ``ranks[i]`` is the global rank of index ``i``.

**Devices** (rules in :mod:`.device`): control tensors live on the group's control device (CPU on
gloo and on mixed ``cpu:gloo,cuda:nccl`` groups, the current GPU on NCCL-only groups); payloads stay
on their device where the backend carries it (NCCL for CUDA, in one batched exchange) and are staged
through the control device otherwise. Control *objects* travel as tagged JSON (:mod:`.control`),
never pickle. On NCCL, waiting with a timeout blocks the host until the op completes (kernels already
queued keep running, so ring overlap survives; the next kernels launch after the wait), which is what
turns a dead peer into our ``CommTimeoutError`` within ``timeout_s``. NCCL ignores tags: there a
skipped op is not detected by tag mismatch but pairs with the peer's next message of the same
pair, so use ``check_sizes=True`` when debugging op-order problems on GPUs.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from . import control
from .device import backend_map, batched_p2p, control_device, group_timeout, transport_device
from .errors import CommError, OpContext, backend_error, wait_works
from .ledger import ByteLedger
from .link import LinkModel

__all__ = ["Communicator", "CommHandle", "MeshGroup", "mesh_partition", "make_mesh_groups",
           "make_mesh_communicators", "summary_all_ranks"]

_MAX_TAG = 2**31 - 1
#: Pairwise (pipeline) messages use tags of their own: [3 * 2**29, 4 * 2**29).
_PAIR_TAG_BASE, _PAIR_TAG_SPAN = 3 << 29, 1 << 29
#: Largest control object accepted (a peer's length field must not make this rank allocate at will).
MAX_CONTROL_BYTES = 64 * 2**20
_REDUCE_OPS = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum, "prod": torch.mul}


class CommHandle:
    """Handle of an op in flight. ``wait()`` returns its result (idempotent) or raises.

    ``modeled_s`` is the op's modelled link time for this rank and ``nbytes_sent`` its bytes on the
    wire, both known at start, so callers can do their own overlap accounting.
    """

    def __init__(self, comm: "Communicator", ctx: OpContext, works: list, finish: Callable[[], Any],
                 modeled_s: float, nbytes_sent: int):
        self._comm, self._ctx, self._works, self._finish = comm, ctx, works, finish
        self.op = ctx.op
        self.modeled_s = modeled_s
        self.nbytes_sent = nbytes_sent
        self._t0 = time.monotonic()
        self._done = False
        self._result: Any = None

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)

    def wait(self) -> Any:
        if self._done:
            return self._result
        try:
            wait_works(self._works, self._ctx)
        except CommError as e:
            self._comm._poison(e)
            raise
        self._result = self._finish()
        self._done = True
        self._works = []
        self._comm._pad_to_model(self._t0, self.modeled_s)
        return self._result

    def __repr__(self) -> str:
        return f"<CommHandle {self._ctx.describe()} done={self._done}>"


def _check_bytes(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        desc = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} must be a 1-D torch.uint8 tensor, got {desc}")
    return t.contiguous()


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of any tensor's storage (copy only if not contiguous)."""
    x = x.contiguous()
    if x.dtype == torch.uint8:
        return x.reshape(-1)
    return x.reshape(-1).view(torch.uint8) if x.dim() > 0 else x.reshape(1).view(torch.uint8)


class Communicator:
    """Process-group wrapper with timeouts, byte ledger and link model (see module docstring).

    ``group=None`` means WORLD. ``ranks`` (global ranks of the group, in group order) is looked up
    from the group when omitted.
    """

    def __init__(self, group: Any = None, link: LinkModel | None = None, ledger: ByteLedger | None = None,
                 timeout_s: float = 30.0, *, ranks: Sequence[int] | None = None, check_sizes: bool = False,
                 owns_group: bool = False):
        if not dist.is_initialized():
            raise RuntimeError("Communicator needs torch.distributed to be initialised (init_process_group)")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.group = group
        self.link = link if link is not None else LinkModel(mode="off")
        self.ledger = ledger if ledger is not None else ByteLedger()
        self.timeout_s = float(timeout_s)
        self.check_sizes = bool(check_sizes)
        if ranks is None:
            ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
        self.ranks: tuple[int, ...] = tuple(int(r) for r in ranks)
        me = dist.get_rank()
        if me not in self.ranks:
            raise ValueError(f"this process (global rank {me}) is not in the group {list(self.ranks)}")
        self.rank = self.ranks.index(me)  # index within the group
        self.size = len(self.ranks)
        self._owns_group = owns_group
        self._seq = 0
        self._tag_base = 0  # temporary communicators on a shared group use a disjoint tag range
        self._pair_seq: dict[tuple[int, int], int] = {}  # (sender, receiver) -> messages issued (pair ops)
        self._pair_busy: dict[int, float] = {}  # sleep mode: when each sender's modelled link is free again
        self._broken: CommError | None = None
        self.backends = backend_map(group)  # {device type: backend}, e.g. {"cpu": "gloo", "cuda": "nccl"}

    def __repr__(self) -> str:
        return (f"Communicator(ranks={list(self.ranks)}, rank={self.rank}, link={self.link!r}, "
                f"timeout_s={self.timeout_s:g})")

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]

    @property
    def control_device(self) -> torch.device:
        """Where control tensors of this group live (see :func:`.device.control_device`)."""
        return control_device(self.backends)

    # -- internals -------------------------------------------------------------------------------
    def _stage(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device its backend carries (itself when it already is)."""
        d = transport_device(x.device, self.backends)
        return x if d == x.device else x.to(d)
    def _ctx(self, op: str, layer: Any, step: Any, tensor: Any) -> OpContext:
        ctx = OpContext(op, layer, step, tensor, self.ranks, self.timeout_s)
        if self._broken is not None:
            raise CommError(f"{ctx.describe()}: this communicator is unusable after an earlier failure "
                            f"({self._broken})", ctx)
        return ctx

    def _poison(self, err: CommError) -> None:
        if self._broken is None:
            self._broken = err

    def _next_tag(self) -> int:
        self._seq += 1
        return (self._tag_base + self._seq) % _MAX_TAG

    def _account(self, ctx: OpContext, messages: list[tuple[int, int, int]], warmup: bool) -> float:
        """Ledger + link model for (peer_global, sent, uncompressed) messages; returns modelled s."""
        modeled = 0.0
        on = self.link.enabled
        for peer, sent, unc in messages:
            sec = self.link.cost(sent) if (on and sent > 0) else 0.0
            modeled += sec
            self.ledger.record(ctx.layer, ctx.step, ctx.tensor, peer, sent, unc, seconds=sec, warmup=warmup)
        return modeled

    def _pad_to_model(self, t0: float, modeled_s: float) -> None:
        if self.link.mode == "sleep":
            rest = modeled_s - (time.monotonic() - t0)
            if rest > 0:
                time.sleep(rest)

    def _guard(self, ctx: OpContext, fn: Callable[[], Any]) -> Any:
        """Run a backend start call, turning its failures into CommError (and poisoning)."""
        try:
            return fn()
        except CommError:
            raise
        except RuntimeError as e:  # DistBackendError is a RuntimeError
            err = backend_error(ctx, e)
            self._poison(err)
            raise err from e

    def _wait(self, ctx: OpContext, works: list) -> None:
        try:
            wait_works(works, ctx)
        except CommError as e:
            self._poison(e)
            raise

    def _start_p2p(self, ctx: OpContext, sends: list[tuple[int, torch.Tensor]],
                   recvs: list[tuple[int, torch.Tensor]], tag: int) -> list:
        """Post all receives, then all sends (so no ordering can deadlock); empty messages skipped.
        On NCCL the whole exchange is one ``batch_isend_irecv`` (NCCL needs sends and receives of an
        exchange grouped; NCCL ignores tags, its per-pair order is the op order)."""
        bufs = [b for _, b in recvs + sends if b.numel() > 0]
        if bufs and batched_p2p(bufs[0].device, self.backends):
            def start_batched():
                ops = [dist.P2POp(dist.irecv, b, self.ranks[i], self.group, tag) for i, b in recvs if b.numel() > 0]
                ops += [dist.P2POp(dist.isend, b, self.ranks[i], self.group, tag) for i, b in sends if b.numel() > 0]
                return list(dist.batch_isend_irecv(ops))
            return self._guard(ctx, start_batched)

        def start():
            works = []
            for i, buf in recvs:
                if buf.numel() > 0:
                    works.append(dist.irecv(buf, src=self.ranks[i], group=self.group, tag=tag))
            for i, buf in sends:
                if buf.numel() > 0:
                    works.append(dist.isend(buf, dst=self.ranks[i], group=self.group, tag=tag))
            return works
        return self._guard(ctx, start)

    def _gather_ints(self, ctx: OpContext, vec: list[int]) -> list[list[int]]:
        """Control all-gather of a fixed-length int64 vector; every member gets every row."""
        if self.size == 1:
            return [list(vec)]
        raw = torch.tensor(vec, dtype=torch.int64, device=self.control_device).view(torch.uint8)
        works, outs, peers = self._start_all_gather(ctx, raw, [raw.numel()] * self.size)
        self._wait(ctx, works)
        self.ledger.record_control(raw.numel() * len(peers), len(peers))
        return torch.stack(outs).view(torch.int64).cpu().tolist()

    def all_gather_ints(self, vec: Sequence[int], *, what: str = "control") -> list[list[int]]:
        """Control all-gather of a fixed-length int64 vector (same length on every rank); returns
        every group rank's vector, in group order."""
        return self._gather_ints(self._ctx("all_gather_ints", None, None, what), [int(v) for v in vec])

    def _size_mismatch(self, ctx: OpContext, problems: list[str]) -> None:
        if problems:  # every rank sees the same table, so every rank raises here: no desync
            raise CommError(f"{ctx.describe()}: sizes disagree between ranks: " + "; ".join(problems[:8]), ctx)

    def _check_sizes_list(self, sizes: Sequence[int], what: str) -> list[int]:
        sizes = [int(s) for s in sizes]
        if len(sizes) != self.size or any(s < 0 for s in sizes):
            raise ValueError(f"{what} must list {self.size} non-negative sizes (one per group rank), got {sizes}")
        return sizes

    def _start_all_gather(self, ctx: OpContext, payload: torch.Tensor, sizes: list[int]):
        tag = self._next_tag()
        recvs = [(i, torch.empty(sizes[i], dtype=torch.uint8, device=payload.device))
                 for i in range(self.size) if i != self.rank]
        peers = [(self.rank + k) % self.size for k in range(1, self.size)]  # spread load: next rank first
        works = self._start_p2p(ctx, [(i, payload) for i in peers], recvs, tag)
        outs: list[Any] = [None] * self.size
        outs[self.rank] = payload
        for i, buf in recvs:
            outs[i] = buf
        return works, outs, peers

    # -- data ops --------------------------------------------------------------------------------
    def all_gather_async(self, payload: torch.Tensor, sizes: Sequence[int], *, layer: Any = None,
                         step: Any = None, tensor: Any = "data", uncompressed_nbytes: int | None = None,
                         warmup: bool = False) -> CommHandle:
        """Variable-size all-gather of 1-D uint8 ``payload``; ``sizes[i]`` = payload size of group rank i.

        Sent as ``size-1`` point-to-point messages of exactly ``payload.numel()`` bytes (no padding),
        which is also what the ledger and link model charge. ``wait()`` returns a list of 1-D uint8
        tensors, one per group rank; entry ``rank`` is ``payload`` itself.
        """
        ctx = self._ctx("all_gather_bytes", layer, step, tensor)
        payload = _check_bytes(payload, "payload")
        sizes = self._check_sizes_list(sizes, "sizes")
        if self.check_sizes and self.size > 1:  # checked on every rank at once, so all raise together
            table = self._gather_ints(ctx, [payload.numel()] + sizes)
            self._size_mismatch(ctx, [f"rank {i} sends {row[0]} bytes but rank {j} expects {table[j][1 + i]}"
                                      for i, row in enumerate(table) for j in range(self.size)
                                      if table[j][1 + i] != row[0]])
        if sizes[self.rank] != payload.numel():
            raise ValueError(f"{ctx.describe()}: sizes[{self.rank}]={sizes[self.rank]} but this rank's payload "
                             f"has {payload.numel()} bytes")
        b = payload.numel()
        unc = b if uncompressed_nbytes is None else int(uncompressed_nbytes)
        works, outs, peers = self._start_all_gather(ctx, self._stage(payload), sizes)
        outs[self.rank] = payload
        modeled = self._account(ctx, [(self.ranks[i], b, unc) for i in peers], warmup)
        dev = payload.device
        return CommHandle(self, ctx, works, lambda: [o.to(dev) for o in outs], modeled, b * len(peers))

    def all_gather_bytes(self, payload: torch.Tensor, sizes: Sequence[int], **kw: Any) -> list[torch.Tensor]:
        """Blocking :meth:`all_gather_async`."""
        return self.all_gather_async(payload, sizes, **kw).wait()

    def all_gather_tensors_async(self, x: torch.Tensor, *, layer: Any = None, step: Any = None,
                                 tensor: Any = "data", uncompressed_nbytes: int | None = None,
                                 warmup: bool = False) -> CommHandle:
        """All-gather of equal-shape, equal-dtype tensors; ``wait()`` returns a list like ``x``."""
        raw = _as_bytes(x)
        h = self.all_gather_async(raw, [raw.numel()] * self.size, layer=layer, step=step, tensor=tensor,
                                  uncompressed_nbytes=uncompressed_nbytes, warmup=warmup)
        inner, me, shape, dtype = h._finish, self.rank, x.shape, x.dtype

        def finish():
            outs = inner()
            return [x if i == me else o.view(dtype).reshape(shape) for i, o in enumerate(outs)]
        h._finish = finish
        return h

    def all_gather_tensors(self, x: torch.Tensor, **kw: Any) -> list[torch.Tensor]:
        return self.all_gather_tensors_async(x, **kw).wait()

    def all_to_all_async(self, chunks: Sequence[torch.Tensor], recv_sizes: Sequence[int], *, layer: Any = None,
                         step: Any = None, tensor: Any = "data",
                         uncompressed_nbytes: Sequence[int] | None = None, warmup: bool = False) -> CommHandle:
        """Uneven all-to-all: ``chunks[i]`` (1-D uint8) goes to group rank i; ``recv_sizes[i]`` bytes
        come from rank i. ``uncompressed_nbytes[i]`` is the raw size of ``chunks[i]`` (default: its
        size). ``wait()`` returns the received chunks, one per group rank; entry ``rank`` is
        ``chunks[rank]`` itself. Sent as one point-to-point message per peer with a non-empty chunk."""
        ctx = self._ctx("all_to_all_bytes", layer, step, tensor)
        if len(chunks) != self.size:
            raise ValueError(f"{ctx.describe()}: need {self.size} chunks (one per group rank), got {len(chunks)}")
        chunks = [_check_bytes(c, f"chunks[{i}]") for i, c in enumerate(chunks)]
        recv_sizes = self._check_sizes_list(recv_sizes, "recv_sizes")
        send_sizes = [c.numel() for c in chunks]
        if self.check_sizes and self.size > 1:
            table = self._gather_ints(ctx, send_sizes + recv_sizes)
            W = self.size
            self._size_mismatch(ctx, [f"rank {i} sends {table[i][j]} bytes to rank {j}, which expects {table[j][W + i]}"
                                      for i in range(W) for j in range(W) if table[i][j] != table[j][W + i]])
        if recv_sizes[self.rank] != send_sizes[self.rank]:
            raise ValueError(f"{ctx.describe()}: recv_sizes[{self.rank}]={recv_sizes[self.rank]} but the chunk to "
                             f"self has {send_sizes[self.rank]} bytes")
        unc = send_sizes if uncompressed_nbytes is None else [int(u) for u in uncompressed_nbytes]
        if len(unc) != self.size:
            raise ValueError(f"{ctx.describe()}: uncompressed_nbytes must have {self.size} entries")
        peers = [i for i in range(self.size) if i != self.rank]
        modeled = self._account(ctx, [(self.ranks[i], send_sizes[i], unc[i]) for i in peers], warmup)
        nbytes = sum(send_sizes[i] for i in peers)
        # Point-to-point, not gloo's all_to_all_single: a timed-out gloo collective leaves its worker
        # thread blocked, and process exit then waits for the group's own timeout (30 min on a
        # default WORLD); timed-out p2p ops leave nothing behind.
        tag = self._next_tag()
        dev = chunks[self.rank].device
        xdev = transport_device(dev, self.backends)
        recvs = [(i, torch.empty(recv_sizes[i], dtype=torch.uint8, device=xdev)) for i in peers]
        order = [(self.rank + k) % self.size for k in range(1, self.size)]
        works = self._start_p2p(ctx, [(i, self._stage(chunks[i])) for i in order], recvs, tag)
        outs: list[Any] = [None] * self.size
        outs[self.rank] = chunks[self.rank]
        for i, buf in recvs:
            outs[i] = buf
        return CommHandle(self, ctx, works, lambda: [o.to(dev) for o in outs], modeled, nbytes)

    def all_to_all_bytes(self, chunks: Sequence[torch.Tensor], recv_sizes: Sequence[int], **kw: Any) -> list[torch.Tensor]:
        """Blocking :meth:`all_to_all_async`."""
        return self.all_to_all_async(chunks, recv_sizes, **kw).wait()

    def ring_exchange(self, send: torch.Tensor, recv_size: int | Sequence[int], dst: int, src: int, *,
                      out: torch.Tensor | None = None, layer: Any = None, step: Any = None, tensor: Any = "data",
                      uncompressed_nbytes: int | None = None, warmup: bool = False) -> CommHandle:
        """Start sending ``send`` to group rank ``dst`` while receiving from group rank ``src``.

        ``recv_size`` is an element count (or a shape) of ``send.dtype``; ``out`` may supply the
        receive buffer. Returns a handle whose ``wait()`` gives the received tensor. The ledger
        records ``send``'s bytes to ``dst`` now.
        """
        ctx = self._ctx("ring_exchange", layer, step, tensor)
        for name, v in (("dst", dst), ("src", src)):
            if not (isinstance(v, int) and 0 <= v < self.size):
                raise ValueError(f"{ctx.describe()}: {name}={v!r} is not a group rank index in [0, {self.size})")
        if (dst == self.rank) != (src == self.rank):
            raise ValueError(f"{ctx.describe()}: dst={dst}, src={src}: cannot exchange with self on one side only")
        send = send.contiguous()
        if out is None:
            shape = (int(recv_size),) if isinstance(recv_size, int) else tuple(recv_size)
            out = torch.empty(shape, dtype=send.dtype, device=send.device)
        elif out.dtype != send.dtype or not out.is_contiguous():
            raise ValueError(f"{ctx.describe()}: out must be a contiguous {send.dtype} tensor")
        nbytes = send.numel() * send.element_size()
        if self.check_sizes and self.size > 1:
            table = self._gather_ints(ctx, [nbytes, out.numel() * out.element_size(), dst, src])
            self._size_mismatch(ctx, [f"rank {i} sends {row[0]} bytes to rank {row[2]}, which expects "
                                      f"{table[row[2]][1]} bytes from rank {table[row[2]][3]}"
                                      for i, row in enumerate(table)
                                      if table[row[2]][3] != i or table[row[2]][1] != row[0]])
        if dst == self.rank:  # a ring of one: local copy, nothing on the wire
            if out.numel() != send.numel():
                raise ValueError(f"{ctx.describe()}: self-exchange of {send.numel()} elements into {out.numel()}")
            out.view(-1).copy_(send.reshape(-1))
            return CommHandle(self, ctx, [], lambda: out, 0.0, 0)
        unc = nbytes if uncompressed_nbytes is None else int(uncompressed_nbytes)
        tag = self._next_tag()
        wire_out = self._stage(out)  # `out` itself unless this backend cannot carry its device

        def finish():
            if wire_out is not out:
                out.copy_(wire_out)
            return out
        works = self._start_p2p(ctx, [(dst, self._stage(send).reshape(-1))], [(src, wire_out)], tag)
        modeled = self._account(ctx, [(self.ranks[dst], nbytes, unc)], warmup)
        return CommHandle(self, ctx, works, finish, modeled, nbytes)

    # -- pairwise ops (pipelines): matched per (sender, receiver) pair, not per group ------------
    def _pair_tag(self, src: int, dst: int) -> int:
        key = (src, dst)
        n = self._pair_seq.get(key, 0)
        self._pair_seq[key] = n + 1
        return _PAIR_TAG_BASE + n % _PAIR_TAG_SPAN

    def pair_send(self, payload: torch.Tensor, dst: int, *, layer: Any = None, step: Any = None,
                  tensor: Any = "data", uncompressed_nbytes: int | None = None, warmup: bool = False) -> CommHandle:
        """Start sending 1-D uint8 ``payload`` to group rank ``dst`` only.

        Unlike the other ops this is not collective over the group: only ``dst`` must post the matching
        :meth:`pair_recv`. Messages of one (sender, receiver) pair pair up in the order they were issued
        (their tags come from a per-pair sequence, in a range of their own), whatever the other members
        do meanwhile. ``wait()`` returns once the message has left (within the timeout)."""
        ctx = self._ctx("pair_send", layer, step, tensor)
        payload = _check_bytes(payload, "payload")
        if not (isinstance(dst, int) and 0 <= dst < self.size and dst != self.rank):
            raise ValueError(f"{ctx.describe()}: dst={dst!r} must be another group rank index in [0, {self.size})")
        tag = self._pair_tag(self.rank, dst)
        n = payload.numel()
        works = self._start_p2p(ctx, [(dst, self._stage(payload))], [], tag) if n else []
        unc = n if uncompressed_nbytes is None else int(uncompressed_nbytes)
        self._account(ctx, [(self.ranks[dst], n, unc)], warmup)
        # The link time is paid by the receiver (see pair_recv): the sender's NIC works while it computes.
        return CommHandle(self, ctx, works, lambda: None, 0.0, n)

    def pair_recv(self, nbytes: int, src: int, *, layer: Any = None, step: Any = None, tensor: Any = "data",
                  device: torch.device | str | None = None, behind: int = 0) -> CommHandle:
        """Start receiving ``nbytes`` bytes from group rank ``src`` (its matching :meth:`pair_send`);
        ``wait()`` returns them as a 1-D uint8 tensor on ``device`` (default: the control device).

        ``behind``: messages of this size that ``src``'s link carries to other ranks before this one (a
        one-to-many send): sleep mode charges them too, as the sender's one outbound link would."""
        ctx = self._ctx("pair_recv", layer, step, tensor)
        if not (isinstance(src, int) and 0 <= src < self.size and src != self.rank):
            raise ValueError(f"{ctx.describe()}: src={src!r} must be another group rank index in [0, {self.size})")
        dev = torch.device(device) if device is not None else self.control_device
        out = torch.empty(int(nbytes), dtype=torch.uint8, device=dev)
        tag = self._pair_tag(src, self.rank)
        wire = self._stage(out)
        works = self._start_p2p(ctx, [], [(src, wire)], tag) if out.numel() else []

        cost = (1 + max(0, int(behind))) * self.link.cost(out.numel()) \
            if (self.link.mode == "sleep" and out.numel()) else 0.0

        def finish():
            if wire is not out:
                out.copy_(wire)
            if cost:  # sleep mode: the sender's link carries its messages one after another
                arrival = max(time.monotonic(), self._pair_busy.get(src, 0.0)) + cost
                self._pair_busy[src] = arrival
                rest = arrival - time.monotonic()
                if rest > 0:
                    time.sleep(rest)
            return out
        return CommHandle(self, ctx, works, finish, 0.0, 0)

    # -- control ops (not data bytes: counted as control, never in the link model) ---------------
    def all_reduce(self, x: torch.Tensor, op: str = "sum", *, what: str = "control") -> torch.Tensor:
        """In-place all-reduce (``op`` in sum/max/min/prod) for small control tensors; returns ``x``.

        Gathers every rank's tensor point-to-point and reduces locally in group order, so every rank
        gets bit-identical results."""
        ctx = self._ctx("all_reduce", None, None, what)
        if op not in _REDUCE_OPS:
            raise ValueError(f"all_reduce op {op!r} not understood; use one of {sorted(_REDUCE_OPS)}")
        if self.size == 1:
            return x
        raw = _as_bytes(x).to(self.control_device, copy=True)
        works, outs, peers = self._start_all_gather(ctx, raw, [raw.numel()] * self.size)
        self._wait(ctx, works)
        self.ledger.record_control(raw.numel() * len(peers), len(peers))
        vals = [o.view(x.dtype).reshape(x.shape).to(x.device) for o in outs]
        acc = vals[0].clone()
        for v in vals[1:]:
            acc = _REDUCE_OPS[op](acc, v)
        x.copy_(acc)
        return x

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, dtype=torch.int64, device=self.control_device), what="barrier")

    def _bytes_tensor(self, data: bytes) -> torch.Tensor:
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return t.to(self.control_device)

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Send ``obj`` from group rank ``src`` to every rank (tagged JSON, see :mod:`.control`: plain
        data only, ``TypeError`` otherwise); returns it on every rank."""
        ctx = self._ctx("broadcast_object", None, None, "control")
        if not (isinstance(src, int) and 0 <= src < self.size):
            raise ValueError(f"{ctx.describe()}: src={src!r} is not a group rank index in [0, {self.size})")
        data, refused = b"", None
        if self.rank == src:
            try:
                data = control.encode(obj)
            except TypeError as e:  # still send a length (-1), so the receivers raise too instead of hanging
                refused = e
        if self.size == 1:
            if refused is not None:
                raise refused
            return obj
        others = [i for i in range(self.size) if i != src]
        dev = self.control_device
        length = torch.tensor([-1 if refused else len(data)], dtype=torch.int64, device=dev)
        tag = self._next_tag()
        lraw = length.view(torch.uint8)
        if self.rank == src:
            self._wait(ctx, self._start_p2p(ctx, [(i, lraw) for i in others], [], tag))
        else:
            self._wait(ctx, self._start_p2p(ctx, [], [(src, lraw)], tag))
        n = int(length.item())
        if refused is not None:
            raise refused
        if n > MAX_CONTROL_BYTES:  # checked on the sender too, so nobody waits for a message never sent
            raise ValueError(f"{ctx.describe()}: a control object of {n} bytes exceeds {MAX_CONTROL_BYTES} bytes")
        if n < 0:
            raise TypeError(f"{ctx.describe()}: rank {self.ranks[src]} passed an object that cannot be sent as a "
                            f"control message (see its TypeError)")
        tag = self._next_tag()
        if self.rank == src:
            self._wait(ctx, self._start_p2p(ctx, [(i, self._bytes_tensor(data)) for i in others], [], tag))
            self.ledger.record_control((n + 8) * len(others), 2 * len(others))
            return obj
        buf = torch.empty(n, dtype=torch.uint8, device=dev)
        self._wait(ctx, self._start_p2p(ctx, [], [(src, buf)], tag))
        return control.decode(buf.cpu().numpy().tobytes())

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (tagged JSON, see :mod:`.control`), in group order. An object that
        cannot be sent raises ``TypeError`` on every rank (the others name the offending ranks)."""
        ctx = self._ctx("all_gather_object", None, None, "control")
        if self.size == 1:
            control.encode(obj)  # same refusal as with peers
            return [obj]
        try:
            data, refused = control.encode(obj), None
        except TypeError as e:  # still join the size exchange (-1), so every rank raises, none hangs
            data, refused = b"", e
        sizes = [row[0] for row in self._gather_ints(ctx, [-1 if refused else len(data)])]
        if refused is not None:
            raise refused
        big = [(self.ranks[i], n) for i, n in enumerate(sizes) if n > MAX_CONTROL_BYTES]
        if big:  # every rank sees the same sizes: all raise together
            raise ValueError(f"{ctx.describe()}: control objects over {MAX_CONTROL_BYTES} bytes from (rank, bytes) {big}")
        bad = [self.ranks[i] for i, n in enumerate(sizes) if n < 0]
        if bad:
            raise TypeError(f"{ctx.describe()}: rank(s) {bad} passed an object that cannot be sent as a control "
                            f"message (see their TypeError)")
        works, outs, peers = self._start_all_gather(ctx, self._bytes_tensor(data), sizes)
        self._wait(ctx, works)
        self.ledger.record_control(len(data) * len(peers), len(peers))
        return [obj if i == self.rank else control.decode(o.cpu().numpy().tobytes()) for i, o in enumerate(outs)]

    def assert_same(self, obj: Any, what: str = "value") -> Any:
        """Raise ``ValueError`` on every rank unless all ranks passed equal ``obj`` (e.g. a config hash)."""
        objs = self.all_gather_object(obj)
        bad = [i for i, o in enumerate(objs) if o != objs[0]]
        if bad:
            shown = ", ".join(f"rank {i}: {objs[i]!r}"[:200] for i in [0] + bad[:4])
            raise ValueError(f"{what} differs across group ranks {list(self.ranks)} ({shown})")
        return obj

    # -- groups ----------------------------------------------------------------------------------
    def subgroup(self, ranks: Sequence[int], *, timeout_s: float | None = None) -> "Communicator | None":
        """New Communicator over the global ``ranks`` (sorted; group index = sorted position), sharing
        this one's link model, ledger and settings. Collective over the *default* group (a
        ``dist.new_group`` rule): every process calls it with the same ranks, in the same order.
        Returns None on processes outside ``ranks``."""
        ranks = sorted(int(r) for r in ranks)
        if len(set(ranks)) != len(ranks) or not set(ranks) <= set(range(dist.get_world_size())):
            raise ValueError(f"subgroup ranks {ranks} must be distinct global ranks")
        t = self.timeout_s if timeout_s is None else float(timeout_s)
        g = dist.new_group(ranks, timeout=group_timeout(t))
        if dist.get_rank() not in ranks:
            return None
        return Communicator(g, self.link, self.ledger, t, ranks=ranks, check_sizes=self.check_sizes, owns_group=True)

    def close(self) -> None:
        """Destroy the process group if this Communicator created it (no-op otherwise)."""
        if self._owns_group and self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
            self._owns_group = False
            self._broken = CommError("communicator closed")


def summary_all_ranks(ledger: ByteLedger, group: Any = None, timeout_s: float = 30.0) -> dict[str, Any]:
    """:meth:`ByteLedger.summary_all_ranks` over ``group`` (a Communicator, a process group, or None for
    WORLD). Collective: every member calls it; a peer that does not join within the timeout (the
    Communicator's own when one is passed) raises ``CommTimeoutError``."""
    if isinstance(group, Communicator):
        comm = group
    else:  # a throwaway communicator on a shared group: its own tag range and ledger (control bytes)
        comm = Communicator(group, None, ByteLedger(), timeout_s)
        comm._tag_base = 1 << 30
    return ledger.summary_all_ranks(lambda vec: comm.all_gather_ints(vec, what="ledger"))


# ---- meshes --------------------------------------------------------------------------------------
class MeshGroup(NamedTuple):
    group: Any
    ranks: tuple[int, ...]  # global ranks of my group along this dimension, in group order
    index: int  # my index in ``ranks``


def mesh_partition(world: int, dims: dict[str, int]) -> dict[str, list[tuple[int, ...]]]:
    """All groups of a row-major mesh (the last dimension varies fastest, e.g. cfg x ulysses x ring
    with ring innermost). For each dimension: the list of rank tuples that differ only along it."""
    if not dims:
        raise ValueError("mesh dims must name at least one dimension")
    sizes = list(dims.values())
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"mesh dims must be positive ints, got {dims}")
    if math.prod(sizes) != world:
        raise ValueError(f"mesh dims {dims} multiply to {math.prod(sizes)}, not the world size {world}")
    strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    out: dict[str, list[tuple[int, ...]]] = {}
    for name, size, stride in zip(dims, sizes, strides):
        out[name] = [tuple(r + j * stride for j in range(size)) for r in range(world) if (r // stride) % size == 0]
    return out


def make_mesh_groups(world: int | None, dims: dict[str, int], *, timeout_s: float = 30.0) -> dict[str, MeshGroup]:
    """Create every group of the mesh on every rank (same order everywhere, as ``new_group`` needs)
    and return, per dimension name, ``(group, ranks_in_my_group, my_index)``."""
    world = dist.get_world_size() if world is None else int(world)
    if world != dist.get_world_size():
        raise ValueError(f"mesh world {world} != torch.distributed world size {dist.get_world_size()}")
    me = dist.get_rank()
    mine: dict[str, MeshGroup] = {}
    for name, groups in mesh_partition(world, dims).items():
        for ranks in groups:
            g = dist.new_group(list(ranks), timeout=group_timeout(timeout_s))
            if me in ranks:
                mine[name] = MeshGroup(g, ranks, ranks.index(me))
    return mine


def make_mesh_communicators(dims: dict[str, int], *, link: LinkModel | None = None, ledger: ByteLedger | None = None,
                            timeout_s: float = 30.0, check_sizes: bool = False) -> dict[str, Communicator]:
    """One Communicator per mesh dimension, sharing ``link`` and ``ledger`` (one ledger per rank)."""
    ledger = ledger if ledger is not None else ByteLedger()
    return {name: Communicator(mg.group, link, ledger, timeout_s, ranks=mg.ranks, check_sizes=check_sizes,
                               owns_group=True)
            for name, mg in make_mesh_groups(None, dims, timeout_s=timeout_s).items()}
