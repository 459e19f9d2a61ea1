"""An alpha-beta model of the link between two ranks, for emulating slow interconnects on one box.

``tc netem`` is not available on the development machines, so link speed is modelled in process.

Cost model (exact, so tests can check it to the last byte):

* One message of ``b`` bytes from one rank to another costs ``cost(b) = latency + b / bandwidth``
  seconds, per direction (``bandwidth = inf`` makes it ``latency``).
* A rank has a single outbound link: the messages it sends within one op are serialised, so a rank's
  modelled time for an op is the **sum over the non-empty messages it sends** of ``cost(bytes)``.
  Receiving is assumed full duplex and costs nothing extra. An empty message is not sent and costs 0.
  A message to oneself is a local copy and costs 0.
* Hence, for the ops of :class:`~compactfusion.comm.group.Communicator` (``W`` = group size):

  - all-gather of ``b`` bytes per rank (sent as ``W-1`` point-to-point messages of ``b``):
    ``(W-1) * (latency + b / bandwidth)``;
  - ring hop (send ``b`` to the next rank): ``latency + b / bandwidth``;
  - all-to-all: ``sum over peers p != me with c_p > 0 of (latency + c_p / bandwidth)``, where ``c_p``
    is the chunk this rank sends to ``p``.

Modes: ``"virtual"`` accumulates modelled seconds (deterministic, nothing sleeps); ``"sleep"`` pads
each op's real elapsed time up to the model, ``sleep(max(0, modelled - elapsed))``; ``"off"`` models
nothing (bytes are still counted by the ledger). In both ``virtual`` and ``sleep`` the ledger's
``modeled_comm_s`` accumulates the modelled seconds; in ``off`` it stays 0.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["LinkModel", "link_cost", "parse_bandwidth", "parse_latency", "format_bandwidth", "format_latency", "MODES"]

MODES = ("off", "sleep", "virtual")

_BW_HELP = 'use a number of bytes/s or a string like "100MB/s", "1.5GiB/s", "10Gbit/s", "25Gbps", "inf"'
_LAT_HELP = 'use a number of seconds or a string like "20us", "1ms", "0.5 s", "0"'

_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_RE = re.compile(rf"^\s*(?P<num>{_NUM})\s*(?P<unit>[A-Za-zµμ/]*)\s*$")

_DEC = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BIN = {"ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
_UNLIMITED = {"inf", "infinity", "unlimited", "none"}


def _bandwidth_unit(unit: str) -> float | None:
    """Bytes/s per unit, or None. Prefixes are case-insensitive; 'B' is a byte, 'b'/'bit' a bit."""
    if unit == "":
        return 1.0
    for suffix, bits in (("bit/s", True), ("bits/s", True), ("bps", True), ("b/s", True), ("Bps", False), ("B/s", False)):
        # 'bps'/'b/s' only with a lower-case b, 'Bps'/'B/s' only with an upper-case B; 'bit' any case.
        if suffix.startswith("bit"):
            if not unit.lower().endswith(suffix):
                continue
        elif not unit.endswith(suffix):
            continue
        prefix = unit[: len(unit) - len(suffix)].lower()
        scale = _DEC.get(prefix, _BIN.get(prefix))
        if scale is None:
            return None
        return scale / 8.0 if bits else scale
    return None


def _check_number(x: Any, what: str, help_: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{what} {x!r} not understood; {help_}")
    v = float(x)
    if math.isnan(v):
        raise ValueError(f"{what} {x!r} is NaN; {help_}")
    if v < 0:
        raise ValueError(f"{what} {x!r} is negative; {help_}")
    return v


def parse_bandwidth(value: Any) -> float:
    """Bytes per second (``math.inf`` for no limit). Decimal MB/GB (1e6/1e9), binary MiB/GiB, bits /8."""
    if value is None:
        return math.inf
    if isinstance(value, str):
        s = value.strip()
        if s.lower() in _UNLIMITED:
            return math.inf
        m = _RE.match(s)
        scale = _bandwidth_unit(m.group("unit")) if m else None
        if m is None or scale is None:
            raise ValueError(f"bandwidth {value!r} not understood; {_BW_HELP}")
        v = float(m.group("num")) * scale
        what = f"bandwidth {value!r}"
    else:
        v = _check_number(value, "bandwidth", _BW_HELP)
        what = f"bandwidth {value!r}"
    if v < 0:
        raise ValueError(f"{what} is negative; {_BW_HELP}")
    if v == 0:
        raise ValueError(f"{what} is zero; {_BW_HELP} (\"inf\" means no limit)")
    return v


# Divisors, not factors: 20 / 1e6 is the float nearest 20e-6, while 20 * 1e-6 is not.
_LAT_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e3, "us": 1e6, "µs": 1e6, "μs": 1e6, "ns": 1e9}


def parse_latency(value: Any) -> float:
    """Seconds per message (>= 0, finite)."""
    if isinstance(value, str):
        m = _RE.match(value)
        if m is None or m.group("unit") not in _LAT_UNITS:
            raise ValueError(f"latency {value!r} not understood; {_LAT_HELP}")
        v = float(m.group("num")) / _LAT_UNITS[m.group("unit")]
        if v < 0:
            raise ValueError(f"latency {value!r} is negative; {_LAT_HELP}")
    else:
        v = _check_number(value, "latency", _LAT_HELP)
    if not math.isfinite(v):
        raise ValueError(f"latency {value!r} is not finite; {_LAT_HELP}")
    return v


def format_bandwidth(bps: float) -> str:
    """Shortest of a few unit spellings that parses back to exactly ``bps`` (else the plain number)."""
    if math.isinf(bps):
        return "inf"
    units = [("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3), ("GiB/s", 2.0**30), ("MiB/s", 2.0**20),
             ("KiB/s", 2.0**10), ("B/s", 1.0)]
    cands = [s for unit, scale in units if bps >= scale or scale == 1.0
             for s in [f"{bps / scale:.6g}{unit}"] if parse_bandwidth(s) == bps]
    return min(cands, key=len) if cands else repr(float(bps))


def format_latency(s: float) -> str:
    for unit, div in (("s", 1.0), ("ms", 1e3), ("us", 1e6), ("ns", 1e9)):
        if s * div >= 1:
            t = f"{s * div:.6g}{unit}"
            if parse_latency(t) == s:
                return t
    return "0" if s == 0 else repr(float(s))


def link_cost(nbytes: float, messages: float, bandwidth: float, latency: float) -> float:
    """The alpha-beta model, in one place: ``messages`` messages carrying ``nbytes`` bytes in all over one
    outbound link cost ``messages * latency + nbytes / bandwidth`` seconds (``bandwidth = inf``: latency only).

    ``LinkModel`` charges every op with it (sleep and virtual modes), and the benches' predictions call it,
    so a change to the model reaches every number at once.
    """
    return messages * latency + (0.0 if math.isinf(bandwidth) else nbytes / bandwidth)


@dataclass(frozen=True)
class LinkModel:
    """Alpha-beta link: ``cost(nbytes) = latency + nbytes / bandwidth`` per message per direction.

    ``LinkModel(bandwidth="1GB/s", latency="20us", mode="virtual")``. After construction
    ``bandwidth`` is a float in bytes/s (``math.inf`` = unlimited) and ``latency`` a float in
    seconds; the object is immutable and hashable, and ``eval(repr(m)) == m``.
    See the module docstring for how ops are charged.
    """

    bandwidth: Any = "1GB/s"
    latency: Any = "20us"
    mode: str = "virtual"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bandwidth", parse_bandwidth(self.bandwidth))
        object.__setattr__(self, "latency", parse_latency(self.latency))
        mode = self.mode.strip().lower() if isinstance(self.mode, str) else self.mode
        if mode not in MODES:
            raise ValueError(f"link mode {self.mode!r} not understood; use one of {', '.join(map(repr, MODES))}")
        object.__setattr__(self, "mode", mode)

    def __repr__(self) -> str:
        return (f"LinkModel(bandwidth={format_bandwidth(self.bandwidth)!r}, "
                f"latency={format_latency(self.latency)!r}, mode={self.mode!r})")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def cost(self, nbytes: float, messages: float = 1) -> float:
        """Seconds for ``messages`` messages of ``nbytes`` bytes in all (:func:`link_cost`); one by default."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if messages < 0:
            raise ValueError(f"messages must be >= 0, got {messages}")
        return link_cost(nbytes, messages, self.bandwidth, self.latency)

    def op_cost(self, message_nbytes: Iterable[int]) -> float:
        """A rank's modelled time for one op: the sum of ``cost`` over its non-empty sent messages."""
        return sum(self.cost(int(b)) for b in message_nbytes if b > 0)

    def all_gather_cost(self, nbytes: int, world: int) -> float:
        return self.op_cost([nbytes] * (world - 1))

    def ring_hop_cost(self, nbytes: int) -> float:
        return self.op_cost([nbytes])

    def all_to_all_cost(self, chunk_nbytes_to_peers: Iterable[int]) -> float:
        """``chunk_nbytes_to_peers`` excludes the chunk to oneself."""
        return self.op_cost(chunk_nbytes_to_peers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description; ``bandwidth_bytes_per_s`` is None when unlimited."""
        return {
            "bandwidth": format_bandwidth(self.bandwidth),
            "latency": format_latency(self.latency),
            "mode": self.mode,
            "bandwidth_bytes_per_s": None if math.isinf(self.bandwidth) else self.bandwidth,
            "latency_s": self.latency,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LinkModel":
        bw = d.get("bandwidth_bytes_per_s", d.get("bandwidth"))
        return cls(bandwidth=bw, latency=d.get("latency_s", d.get("latency", 0.0)), mode=d.get("mode", "virtual"))
