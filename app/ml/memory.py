"""Peak memory of a piece of work: GPU allocations on CUDA, resident set size on CPU; and
handing freed heap memory back to the system."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import sys
from functools import cache
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    """Start a new high-water mark (on Linux, writing 5 to clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Not Linux or not permitted: the peak then counts from process start.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def peak_mb(device: torch.device) -> float:
    """Peak since the last `reset_peak`: CUDA allocations, or the process's resident peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl)
    except OSError:
        return None


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc `malloc_trim`). Why: after a large
    transient buffer is freed (a delta blob read from the store), glibc raises its mmap threshold
    and keeps later buffers of that size in the heap, where freed pages stay resident."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
