"""Saving a bundled pipeline (transformer, label embedder, scheduler, marker json) as a folder of safetensors."""
from __future__ import annotations

import json
from pathlib import Path


def save_pipeline_folder(pipe, path: str | Path, marker: str, pipeline: str, metadata: dict | None) -> None:
    """The folder layout both bundled models load from; ``marker`` (with ``metadata``) says which model it is."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.transformer.save_pretrained(path / "transformer", safe_serialization=True)
    pipe.label_embedder.save_pretrained(path / "label_embedder", safe_serialization=True)
    pipe.scheduler.save_pretrained(path / "scheduler")
    (path / marker).write_text(json.dumps({"pipeline": pipeline, **(metadata or {})}, indent=1))
