"""Byte accounting for everything a rank sends.

Kept deliberately cheap: one dict update of Python ints per message, no tensors. Each record is
keyed by ``(layer, step, tensor, peer, warmup)``; ``peer`` is the receiver's *global* rank so that
records from different sub-groups stay unambiguous. Control traffic (sizes, config hashes, ledger
reductions) is counted apart from data and never enters ``bytes_sent`` or ``modeled_comm_s``.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable

__all__ = ["ByteLedger"]

# Per-key accumulator layout: [bytes_sent, bytes_uncompressed, messages, modeled_s]
_SENT, _UNC, _MSG, _SEC = range(4)
_FIELDS = ("layer", "step", "tensor", "peer", "warmup")


def _ratio(unc: int, sent: int) -> float:
    return unc / sent if sent > 0 else 1.0


def _row(acc: list) -> dict[str, Any]:
    return {"bytes_sent": acc[_SENT], "bytes_uncompressed": acc[_UNC], "messages": acc[_MSG],
            "modeled_comm_s": acc[_SEC], "compression_ratio": _ratio(acc[_UNC], acc[_SENT])}


class ByteLedger:
    """Per ``(layer, step, tensor, peer)`` bytes sent vs. bytes the uncompressed tensor needed."""

    def __init__(self) -> None:
        self._acc: dict[tuple, list] = {}
        self.control_bytes = 0
        self.control_messages = 0

    # -- recording ---------------------------------------------------------------------------
    def record(self, layer: Hashable, step: Hashable, tensor: Hashable, peer: int, sent: int,
               uncompressed: int, *, seconds: float = 0.0, warmup: bool = False) -> None:
        """One message of ``sent`` bytes to ``peer`` standing for ``uncompressed`` raw bytes.

        ``seconds`` is its modelled link time. A message with ``sent == 0`` was not transmitted: its
        uncompressed bytes still count (so the ratio reflects it) but it adds no message.
        """
        key = (layer, step, tensor, peer, bool(warmup))
        acc = self._acc.get(key)
        if acc is None:
            acc = self._acc[key] = [0, 0, 0, 0.0]
        acc[_SENT] += int(sent)
        acc[_UNC] += int(uncompressed)
        acc[_MSG] += 1 if sent > 0 else 0
        acc[_SEC] += seconds

    def record_control(self, nbytes: int, messages: int = 1) -> None:
        self.control_bytes += int(nbytes)
        self.control_messages += int(messages)

    def reset(self) -> None:
        self._acc.clear()
        self.control_bytes = 0
        self.control_messages = 0

    def __len__(self) -> int:
        return len(self._acc)

    # -- queries -----------------------------------------------------------------------------
    def _total(self, pred=None) -> list:
        tot = [0, 0, 0, 0.0]
        for key, acc in self._acc.items():
            if pred is None or pred(key):
                for i in range(4):
                    tot[i] += acc[i]
        return tot

    def summary(self) -> dict[str, Any]:
        """Totals; ``compression_ratio`` = uncompressed / sent (1.0 when nothing was sent)."""
        all_ = self._total()
        warm = self._total(lambda k: k[4])
        after = [a - w for a, w in zip(all_, warm)]
        return {
            "bytes_sent": all_[_SENT],
            "bytes_uncompressed": all_[_UNC],
            "compression_ratio": _ratio(all_[_UNC], all_[_SENT]),
            "modeled_comm_s": all_[_SEC],
            "messages": all_[_MSG],
            "bytes_sent_warmup": warm[_SENT],
            "bytes_uncompressed_warmup": warm[_UNC],
            "bytes_sent_after_warmup": after[_SENT],
            "bytes_uncompressed_after_warmup": after[_UNC],
            "compression_ratio_after_warmup": _ratio(after[_UNC], after[_SENT]),
            "control_bytes": self.control_bytes,
            "control_messages": self.control_messages,
        }

    def group_by(self, *fields: str) -> dict[Any, dict[str, Any]]:
        """Aggregate over any of ``layer, step, tensor, peer, warmup``; one field gives scalar keys."""
        idx = [_FIELDS.index(f) for f in fields]
        out: dict[Any, list] = {}
        for key, acc in self._acc.items():
            k = key[idx[0]] if len(idx) == 1 else tuple(key[i] for i in idx)
            tot = out.setdefault(k, [0, 0, 0, 0.0])
            for i in range(4):
                tot[i] += acc[i]
        try:
            keys = sorted(out, key=lambda k: (k is None, k))
        except TypeError:  # mixed key types (e.g. int and str layers): keep insertion order
            keys = list(out)
        return {k: _row(out[k]) for k in keys}

    def by_step(self) -> dict[Any, dict[str, Any]]:
        return self.group_by("step")

    def by_layer(self) -> dict[Any, dict[str, Any]]:
        return self.group_by("layer")

    def by_tensor(self) -> dict[Any, dict[str, Any]]:
        return self.group_by("tensor")

    def by_peer(self) -> dict[Any, dict[str, Any]]:
        return self.group_by("peer")

    def records(self) -> list[dict[str, Any]]:
        """Every accumulated key as a flat dict (for CSV/JSON dumps)."""
        return [dict(zip(_FIELDS, key), **_row(acc)) for key, acc in self._acc.items()]

    # -- combining ---------------------------------------------------------------------------
    def merge(self, other: "ByteLedger") -> "ByteLedger":
        """Add ``other``'s records into this ledger (in place); returns self."""
        for key, acc in other._acc.items():
            mine = self._acc.setdefault(key, [0, 0, 0, 0.0])
            for i in range(4):
                mine[i] += acc[i]
        self.control_bytes += other.control_bytes
        self.control_messages += other.control_messages
        return self

    @classmethod
    def merged(cls, ledgers: Iterable["ByteLedger"]) -> "ByteLedger":
        out = cls()
        for lg in ledgers:
            out.merge(lg)
        return out

    _VEC = ("bytes_sent", "bytes_uncompressed", "messages", "bytes_sent_warmup", "bytes_uncompressed_warmup",
            "control_bytes", "control_messages")

    def summary_all_ranks(self, gather: Callable[[list[int]], list[list[int]]]) -> dict[str, Any]:
        """Totals over a group, from one all-gather of a small int64 vector per rank.

        ``gather(vec)`` must return every group member's ``vec`` in group order (e.g.
        ``Communicator.all_gather_ints``; :func:`compactfusion.comm.summary_all_ranks` wires one up):
        the ledger does no I/O itself. Modelled seconds travel as integer nanoseconds. Returns the
        summed byte and message counts, ``modeled_comm_s`` = max over ranks (ranks send concurrently),
        ``modeled_comm_s_sum``, ``world_size`` and ``per_rank`` (one summary per group rank).
        """
        s = self.summary()
        vec = [int(s[k]) for k in self._VEC] + [int(round(s["modeled_comm_s"] * 1e9))]
        rows = gather(vec)
        per_rank = []
        for v in rows:
            d: dict[str, Any] = dict(zip(self._VEC, v))
            d["modeled_comm_s"] = v[-1] / 1e9
            d["compression_ratio"] = _ratio(d["bytes_uncompressed"], d["bytes_sent"])
            per_rank.append(d)
        tot: dict[str, Any] = {k: sum(d[k] for d in per_rank) for k in self._VEC}
        tot["compression_ratio"] = _ratio(tot["bytes_uncompressed"], tot["bytes_sent"])
        tot["bytes_sent_after_warmup"] = tot["bytes_sent"] - tot["bytes_sent_warmup"]
        tot["bytes_uncompressed_after_warmup"] = tot["bytes_uncompressed"] - tot["bytes_uncompressed_warmup"]
        tot["compression_ratio_after_warmup"] = _ratio(tot["bytes_uncompressed_after_warmup"],
                                                       tot["bytes_sent_after_warmup"])
        tot["modeled_comm_s"] = max(d["modeled_comm_s"] for d in per_rank)
        tot["modeled_comm_s_sum"] = sum(d["modeled_comm_s"] for d in per_rank)
        tot["world_size"] = len(per_rank)
        tot["per_rank"] = per_rank
        return tot
