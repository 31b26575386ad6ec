"""Peak memory of this process (and of the GPU, where torch is already in use)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_memory() -> dict[str, float]:
    mem = {"host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        mem["gpu_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return mem


def host_rss_gib() -> dict[str, float]:
    """This process's resident set now and at its peak so far (Linux /proc; empty elsewhere): sampled per layer
    by the stream engine, so a report shows where the peak came from."""
    try:
        status = Path("/proc/self/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    except OSError:
        return {}
    return {"now": round(int(fields["VmRSS"].split()[0]) / 2**20, 3),
            "peak": round(int(fields["VmHWM"].split()[0]) / 2**20, 3)}
