"""Control messages between ranks as tagged JSON: nothing a peer sends is ever executed.

Pickle would run code chosen by whoever can reach a rank's port; JSON only builds data. Python's
JSON alone would lose what the callers rely on (tuples compared with ``==``, dicts keyed by stream
tuples such as ``(0, 'k', 0)``, non-finite floats), so containers carry a one-letter tag:

* ``None``, ``bool``, ``int`` (any size), ``str`` and finite ``float`` are plain JSON values;
* ``list`` -> ``["L", item, ...]``, ``tuple`` -> ``["T", item, ...]``;
* ``dict`` -> ``["D", [key, value], ...]`` (keys may be any encodable value, e.g. tuples);
* non-finite ``float`` -> ``["F", "nan" | "inf" | "-inf"]``.

Anything else (sets, bytes, numpy scalars, tensors, objects, subclasses of the types above) is refused
with ``TypeError`` naming where it sits; a malformed message is refused with ``ValueError``.
"""
from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["encode", "decode", "MAX_DEPTH"]

#: Nesting limit (protects both sides' recursion; control messages are a few levels deep).
MAX_DEPTH = 64
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _enc(x: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise TypeError(f"control message nested deeper than {MAX_DEPTH} levels at {path}")
    t = type(x)
    if x is None or t is bool or t is int or t is str:
        return x
    if t is float:
        return x if math.isfinite(x) else ["F", "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")]
    if t is list or t is tuple:
        return ["L" if t is list else "T"] + [_enc(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x)]
    if t is dict:
        return ["D"] + [[_enc(k, f"{path} key {k!r}"[:200], depth + 1), _enc(v, f"{path}[{k!r}]"[:200], depth + 1)]
                        for k, v in x.items()]
    raise TypeError(f"control message: {t.__name__} at {path} cannot be sent between ranks; use None, bool, int, "
                    f"float, str, or lists/tuples/dicts of them (convert it first, e.g. str(dtype), int(n))")


def encode(obj: Any) -> bytes:
    """UTF-8 JSON bytes of ``obj`` (see the module docstring for what may be sent)."""
    return json.dumps(_enc(obj, "the message", 0), separators=(",", ":"), allow_nan=False).encode()


def _dec(x: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"control message nested deeper than {MAX_DEPTH} levels")
    t = type(x)
    if x is None or t in (bool, int, str, float):
        return x
    if t is not list or not x or x[0] not in ("L", "T", "D", "F"):
        raise ValueError(f"malformed control message: untagged {t.__name__} {str(x)[:80]}")
    tag, rest = x[0], x[1:]
    if tag == "L":
        return [_dec(v, depth + 1) for v in rest]
    if tag == "T":
        return tuple(_dec(v, depth + 1) for v in rest)
    if tag == "F":
        if len(rest) != 1 or rest[0] not in _NONFINITE:
            raise ValueError(f"malformed control message: bad float {rest!r:.80}")
        return _NONFINITE[rest[0]]
    out = {}
    for pair in rest:
        if type(pair) is not list or len(pair) != 2:
            raise ValueError(f"malformed control message: dict entry {str(pair)[:80]} is not a [key, value] pair")
        k = _dec(pair[0], depth + 1)
        try:
            out[k] = _dec(pair[1], depth + 1)
        except TypeError:  # an unhashable key (a list): not something encode() produces
            raise ValueError(f"malformed control message: unhashable dict key {str(k)[:80]}") from None
    return out


def decode(data: bytes) -> Any:
    """Inverse of :func:`encode`; raises ``ValueError`` on anything :func:`encode` cannot produce."""
    try:
        raw = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed control message: {e}") from None
    except RecursionError:
        raise ValueError("malformed control message: nested too deeply") from None
    return _dec(raw, 0)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"malformed control message: bare {name} (non-finite floats are tagged)")
