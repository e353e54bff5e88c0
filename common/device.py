"""Device choice (CUDA when present, else CPU; override with HW3_DEVICE), the CPU thread count, opt-in bf16 autocast.

HW3_NUM_THREADS (optional) sets torch's intra-op CPU threads. It is read here and only here, when `common` is
imported; no library or notebook code forces a thread count. Unset, torch's default (one per core) stays.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def get_device(override: str | torch.device | None = None) -> torch.device:
    """Return `override`, else $HW3_DEVICE, else CUDA if available, else CPU."""
    name = override if override is not None else os.environ.get("HW3_DEVICE")
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but CUDA is not available on this machine")
    return device


def apply_num_threads() -> int | None:
    """Set torch's intra-op threads to $HW3_NUM_THREADS when it is set; returns that count (None when unset)."""
    value = os.environ.get("HW3_NUM_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"HW3_NUM_THREADS must be a positive integer (CPU threads for torch), got {value!r}; "
                         "unset it to use torch's default of one thread per core")
    if torch.get_num_threads() != int(value):
        torch.set_num_threads(int(value))
    return int(value)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when `bf16` is set, otherwise a no-op (fp32 is the default everywhere)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


apply_num_threads()


def timed(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[T, float]:
    """(fn(), wall seconds), synchronising CUDA before and after so the time covers the queued kernels."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)  # CUDA runs asynchronously: wait before reading the clock
    return result, time.perf_counter() - start
