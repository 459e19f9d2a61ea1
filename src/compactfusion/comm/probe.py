"""Short measurements every rank of a group agrees on: the link between ring neighbours, and the
slowest rank's value of any per-rank timing.

Decisions taken from measurements (e.g. ``codec="auto"``) must be identical on every rank, or the
ranks would expect different message sizes; so every number returned here is first reduced over
the group (worst case: lowest bandwidth, highest latency, longest time) and is bitwise equal on all
members. Everything runs on a side Communicator (own ledger and tag range), so probes never show up
in the data ledger, and each op keeps the Communicator's timeout.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import NamedTuple, Sequence

import torch

from .group import Communicator
from .ledger import ByteLedger

__all__ = ["LinkEstimate", "probe_link", "agree_max", "side_communicator"]

_PROBE_TAG_BASE = 1 << 29


class LinkEstimate(NamedTuple):
    """``cost(b) = latency_s + b / bandwidth_Bps`` fitted to ring-hop times (``inf`` = no measurable cost)."""

    bandwidth_Bps: float
    latency_s: float
    small_s: float  # median hop time of the small message (slowest rank)
    large_s: float  # median hop time of the large message (slowest rank)


def side_communicator(comm: Communicator) -> Communicator:
    """A Communicator on ``comm``'s group with the same link model and timeout, but its own ledger and a
    disjoint tag range (collective use only, like every op: all members must make the same calls)."""
    side = Communicator(comm.group, comm.link, ByteLedger(), comm.timeout_s, ranks=comm.ranks)
    side._tag_base = _PROBE_TAG_BASE
    return side


def agree_max(comm: Communicator, values: Sequence[float]) -> list[float]:
    """Per entry, the largest value over the group's ranks (as integer nanounits, so every rank gets the
    same floats). Non-finite or negative values are refused (they would hide a broken timing)."""
    vals = [float(v) for v in values]
    if any(not math.isfinite(v) or v < 0 for v in vals):
        raise ValueError(f"agree_max needs finite values >= 0, got {vals}")
    if comm.size == 1:
        return [round(v * 1e9) / 1e9 for v in vals]
    rows = side_communicator(comm).all_gather_ints([round(v * 1e9) for v in vals], what="agree_max")
    return [max(r[i] for r in rows) / 1e9 for i in range(len(vals))]


def probe_link(comm: Communicator, *, small: int = 8, large: int = 256 * 1024, reps: int = 3,
               device: torch.device | str = "cpu") -> LinkEstimate:
    """Time ring hops (send to the next rank, receive from the previous) of ``small`` and ``large`` bytes
    on ``device``, ``reps`` times each after one warm-up hop, and fit the alpha-beta model.

    Each hop is one ``ring_exchange`` with the group's timeout, so a dead peer raises
    ``CommTimeoutError``; the probe costs ``(reps + 1) * 2`` hops, e.g. about 0.8 s at 1 MB/s with the
    defaults. With ``link.mode == "sleep"`` the emulated link is what gets measured. A one-rank
    group returns an infinitely fast link.
    """
    if not (isinstance(small, int) and isinstance(large, int) and 0 < small < large):
        raise ValueError(f"probe sizes must be integers with 0 < small < large, got small={small!r}, large={large!r}")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an integer >= 1, got {reps!r}")
    if comm.size == 1:
        return LinkEstimate(math.inf, 0.0, 0.0, 0.0)
    side = side_communicator(comm)
    nxt, prv = (side.rank + 1) % side.size, (side.rank - 1) % side.size
    med = []
    for n in (small, large):
        buf = torch.zeros(n, dtype=torch.uint8, device=device)
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            side.ring_exchange(buf, n, dst=nxt, src=prv, tensor="probe").wait()
            if i:  # the first hop pays connection set-up
                times.append(time.perf_counter() - t0)
        med.append(statistics.median(times))
    t_small, t_large = agree_max(comm, med)
    extra = t_large - t_small
    bw = math.inf if extra <= 0 else (large - small) / extra
    lat = max(0.0, t_small - (0.0 if math.isinf(bw) else small / bw))
    return LinkEstimate(bw, lat, t_small, t_large)
