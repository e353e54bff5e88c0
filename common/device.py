"""Device choice (CUDA when present, else CPU; override with HW3_DEVICE) and opt-in bf16 autocast."""

from __future__ import annotations

import contextlib
import os

import torch


def get_device(override: str | torch.device | None = None) -> torch.device:
    """Return `override`, else $HW3_DEVICE, else CUDA if available, else CPU."""
    name = override if override is not None else os.environ.get("HW3_DEVICE")
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but CUDA is not available on this machine")
    return device


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when `bf16` is set, otherwise a no-op (fp32 is the default everywhere)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
