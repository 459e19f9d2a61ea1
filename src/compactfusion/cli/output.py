"""Atomic outputs: every file is written under a temporary name in its folder and renamed into place, so an
interrupted run leaves either the old file or the new one, never half of one; ``prepare_out`` clears an
earlier run's results (with ``--overwrite``) so two runs never mix in one folder."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .validate import existing_results


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def save_image_atomic(image, path: Path) -> None:
    """Save a PIL image as PNG, atomically."""
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def save_video_atomic(frames, path: Path, fps: float = 8.0) -> None:
    """Save a list of PIL frames as a looping GIF, atomically (8-bit grayscale frames stay lossless)."""
    import io
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=list(frames[1:]), duration=round(1000 / fps), loop=0)
    write_atomic(path, buf.getvalue())


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; remove an earlier run's results when ``overwrite`` (validation refused them otherwise)."""
    out.mkdir(parents=True, exist_ok=True)
    found = existing_results(out)
    if found and not overwrite:
        raise ValueError(f"--out {str(out)[:80]!r} already holds results; pass --overwrite or pick another folder")
    # the report goes first: a folder without report.json is visibly not a finished run
    for p in sorted(found, key=lambda p: p.name != "report.json"):
        p.unlink(missing_ok=True)
