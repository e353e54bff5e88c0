"""Is the Hugging Face hub usable? Every online data/model path asks this first, so an offline machine fails over
to the offline sources in seconds instead of waiting for HTTP time-outs."""

from __future__ import annotations

import os
import socket
import threading
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
