"""Is the Hugging Face hub usable? Every online data/model path asks this first, so an offline machine fails over
to the offline sources in seconds instead of waiting for HTTP time-outs; `hub_snapshot` fetches a repo's files."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason): False at once when an HF offline variable is set, else a TCP connect within `timeout` s.

    The DNS lookup runs in a thread too, so a machine without network answers within `timeout`, not minutes.
    """
    offline = [name for name in OFFLINE_VARIABLES if _env_true(name)]
    if offline:
        return False, f"{'/'.join(offline)} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[str] = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append("ok")
        except OSError as err:
            result.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return False, f"{host} did not answer within {timeout:.0f} s"
    return result[0] == "ok", (f"{host} answered" if result[0] == "ok" else f"{host} unreachable ({result[0]})")


def hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None, hint: str = "") -> Path:
    """Local folder with the hub repo's files: downloaded when the hub answers, else from the local HF cache.

    `hint` ends the error raised when neither works (e.g. which offline alternative the caller has).
    """
    from huggingface_hub import snapshot_download  # heavy; only the online paths need it

    reachable, reason = hub_reachable()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=not reachable))
    except Exception as err:  # hub errors come in many types (HTTP, offline, missing cache entry)
        raise RuntimeError(
            f"cannot load {repo_id!r}: not a local directory, the hub is not usable ({reason}) and it is not in the "
            f"local Hugging Face cache ({type(err).__name__}). {hint}".rstrip()
        ) from err
