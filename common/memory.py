"""Peak memory of a block of code: the CUDA allocator's peak, or the process's peak resident set size on a CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def _rss_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in KiB; None elsewhere."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def peak_memory(device: torch.device | str) -> Iterator[dict]:
    """Measure the peak extra memory of the block; the yielded dict gets `peak_mb` and `method` on exit.

    CUDA: `torch.cuda.max_memory_allocated` above the memory allocated on entry. CPU: tracemalloc cannot see
    torch's allocator, so we read the process's peak resident set size: reset the peak mark on entry (Linux) and
    report peak - resident on entry; without the reset we fall back to the growth of `ru_maxrss`, which only sees
    memory above the earlier peak of the process (an underestimate, said so in `method`).
    """
    device = torch.device(device)
    result: dict = {}
    _release_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.update(peak_mb=(torch.cuda.max_memory_allocated(device) - start) / 2**20, method="cuda max allocated")
        return
    if _reset_rss_peak() and _rss_kib("VmRSS") is not None:
        start = _rss_kib("VmRSS")
        yield result
        result.update(peak_mb=(_rss_kib("VmHWM") - start) / 1024, method="peak RSS - RSS at start (VmHWM reset)")
        return
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    yield result
    end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    result.update(peak_mb=(end - start) / 2**20, method="ru_maxrss growth (lower bound)")


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so an earlier run's leftovers do not hide the next
    run's growth in RSS."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and sys.platform.startswith("linux"):
        ctypes.CDLL(libc).malloc_trim(0)
