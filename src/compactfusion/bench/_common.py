"""Shared helpers for ``compactfusion bench ...`` output.

Convention for every bench command: ``--out DIR`` writes DIR/results.json (a JSON list of row
dicts), DIR/results.csv (one line per row, the union of all row keys as columns) and
DIR/results.md (the human-readable report).
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_record() -> dict[str, Any]:
    """Where and with what a benchmark ran: machine, cores, versions, UTC date.

    Versions come from package metadata, so nothing heavy (diffusers) is imported.
    """
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    gpu = None
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "compactfusion": _version("compactfusion"),
    }


def environment_markdown(env: dict[str, Any] | None = None) -> str:
    env = environment_record() if env is None else env
    return "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n"


def json_safe(value: Any) -> Any:
    """JSON-safe value: NaN/Inf -> None, tensors/dtypes/paths -> str, containers recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return json_safe(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        cells = {}
        for k, v in r.items():
            v = json_safe(v)
            cells[k] = json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
        w.writerow(cells)
    return buf.getvalue()


def write_outputs(out_dir: str | os.PathLike, rows: Iterable[dict[str, Any]], markdown: str) -> dict[str, Path]:
    """Write out_dir/results.{json,csv,md}; returns the three paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = [json_safe(dict(r)) for r in rows]
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(clean, indent=1) + "\n", encoding="utf-8")
    paths["csv"].write_text(rows_to_csv(clean), encoding="utf-8")
    paths["md"].write_text(markdown if markdown.endswith("\n") else markdown + "\n", encoding="utf-8")
    return paths


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], floatfmt: str = ".4g") -> str:
    """A Markdown table of ``rows`` with (key, header) columns; floats use ``floatfmt``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt) if math.isfinite(v) else "-"
        return "-" if v is None else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def check_codec_specs(codecs) -> None:
    """Fail fast on an unknown codec spec (ValueError -> one-line usage error); "none" means uncompressed."""
    from ..codecs import get_codec
    for c in codecs:
        if c != "none":
            get_codec(c)


def parse_worlds(text: str) -> list[int]:
    """``--worlds 2,4`` -> [2, 4]; every size must be >= 2."""
    from ..cli.args import UsageError
    try:
        worlds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--worlds must be a comma list of integers, got {text!r}") from None
    if not worlds or any(w < 2 for w in worlds):
        raise UsageError(f"--worlds must list sizes >= 2, got {text!r}")
    return worlds
