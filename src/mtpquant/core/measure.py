"""Peak memory of this process (and of the GPU, where torch is already in use)."""

from __future__ import annotations

import resource
import sys


def peak_memory() -> dict[str, float]:
    mem = {"host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        mem["gpu_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return mem
