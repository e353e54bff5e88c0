"""Atomic file writes: a reader (or a resumed run) never sees a half-written checkpoint, cache or summary file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)` through a temporary file in the same folder, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def merge_json(path: str | Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `updates` into the JSON object at `path` (created if missing) and write it back atomically.

    Several notebooks fill one summary file this way (e.g. 2_1 writes its "vae" entry and 2_3 its "ldm" entry of
    fig/part2_summary.json): a key that `updates` does not name keeps its value. Returns the merged object.
    """
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(data, dict) or not isinstance(updates, dict):
        raise TypeError(f"merge_json merges JSON objects; {path} or the update is not one")

    def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        out = dict(old)
        for key, value in new.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    data = merge(data, updates)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return data
