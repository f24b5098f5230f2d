"""Peak memory of a piece of work: GPU allocations on CUDA, resident set size on CPU."""

from __future__ import annotations

import contextlib
import resource
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
