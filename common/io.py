"""Atomic file writes: a reader (or a resumed run) never sees a half-written checkpoint, cache or summary file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its folder is created) to write the file to; on a clean exit it is
    renamed onto `path`, atomically (same file system), and on an error removed, so `path` holds the old file or
    the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)` through `atomic_path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


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
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return data
