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


def host_ram_gib() -> float:
    """This node's memory for a process, GiB: the physical memory, or the cgroup's limit where it is lower (a
    container started with --memory)."""
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total / 2**30
