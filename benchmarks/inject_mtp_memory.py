"""inject-mtp: peak RSS while copying a multi-GB MTP layer, and throughput against a plain file copy.

Builds a tiny GLM-4.5-layout base, quantizes it with the real quantize stage, then swaps its MTP layer for
one of `--gb` GB (same tensor names, larger shapes, random bytes) and runs inject-mtp in child processes.
Peak RSS is the child's ru_maxrss; the baseline child imports the same code and reads the same headers
but copies nothing. Throughput is compared with `shutil.copyfile` of the same shard, alternating runs.

    python benchmarks/inject_mtp_memory.py --gb 2.5 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

CHILD = """
import sys, time
from pathlib import Path
from mtpquant.core.checkpoint import Checkpoint
from mtpquant.chain.inject_mtp import inject_mtp
base, q, out, mode = sys.argv[1:5]
t = time.perf_counter()
if mode == "inject":
    inject_mtp(Path(base), Path(q), Path(out))
else:  # baseline: same imports, same header reads, no copy
    Checkpoint(Path(base)).tensors, Checkpoint(Path(q)).tensors
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(time.perf_counter() - t, hwm / 1024)
"""


def child(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child process, from its own VmHWM (ru_maxrss would include the
    pages of the parent it was forked from)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed with status {proc.returncode}")
    seconds, rss = proc.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(rss)


def big_base(work: Path, gb: float) -> tuple[Path, Path, int]:
    """A tiny base whose MTP layer is replaced by `gb` GB of tensors, its quantized twin, and the MTP bytes."""
    from mtpquant.calib.quantize import quantize
    from mtpquant.core.checkpoint import safetensors_header_bytes
    from mtpquant.model.recipes import FixtureSpec
    from mtpquant.tiny.fixture import write_fixture

    base = write_fixture("glm4_moe", FixtureSpec(), work / "base")
    quantize(base, "w4a16-asym-g128", "tiny-local", work / "quantized")
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    mtp = sorted(n for n in index["weight_map"] if n.startswith("model.layers.3."))
    experts = [n for n in mtp if ".mlp.experts." in n]
    rows = int(gb * 2**30 / len(experts)) // (2 * 4096)  # BF16 [rows, 4096] per expert tensor
    nbytes_each = rows * 4096 * 2
    rng = np.random.default_rng(0)
    with open(base / "mtp-big.safetensors", "wb") as fh:  # streamed: random bytes, never all in memory
        fh.write(safetensors_header_bytes((n, "BF16", (rows, 4096), nbytes_each) for n in experts))
        for _ in experts:
            fh.write(rng.integers(0, 2**16, size=rows * 4096, dtype=np.uint16).tobytes())
    index["weight_map"].update(dict.fromkeys(experts, "mtp-big.safetensors"))
    index_path.write_text(json.dumps(index))
    nbytes = nbytes_each * len(experts)
    return base, work / "quantized", nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "inject_mtp_memory.json"))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mtpquant-bench-"))
    try:
        base, quantized, nbytes = big_base(work, args.gb)
        shard = base / "mtp-big.safetensors"
        runs = {"baseline": [], "inject": [], "copy": []}
        for _ in range(args.repeat):
            runs["baseline"].append(child(str(base), str(quantized), str(work / "out"), "baseline"))
            runs["inject"].append(child(str(base), str(quantized), str(work / "out"), "inject"))
            t = time.perf_counter()
            shutil.copyfile(shard, work / "copy.safetensors")
            runs["copy"].append((time.perf_counter() - t, float("nan")))
            (work / "copy.safetensors").unlink()
        med = {k: (statistics.median(s for s, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()}
        result = {
            "mtp_bytes": nbytes, "repeat": args.repeat,
            "baseline_peak_rss_mib": round(med["baseline"][1], 1),
            "inject_peak_rss_mib": round(med["inject"][1], 1),
            "inject_rss_over_baseline_mib": round(med["inject"][1] - med["baseline"][1], 1),
            "inject_seconds_median": round(med["inject"][0], 3),
            "copy_seconds_median": round(med["copy"][0], 3),
            "inject_mb_s": round(nbytes / 2**20 / med["inject"][0], 1),
            "copy_mb_s": round(nbytes / 2**20 / med["copy"][0], 1),
            "inject_vs_copy_throughput": round(med["copy"][0] / med["inject"][0], 3),
            "raw": runs,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"inject-mtp on a {nbytes / 2**30:.2f} GiB MTP layer (median of {args.repeat})")
    for col in ("", "seconds", "MB/s", "peak RSS MiB"):
        table.add_column(col)
    table.add_row("baseline (imports + headers)", f"{med['baseline'][0]:.3f}", "", f"{med['baseline'][1]:.0f}")
    table.add_row("inject-mtp", f"{med['inject'][0]:.3f}", f"{result['inject_mb_s']}", f"{med['inject'][1]:.0f}")
    table.add_row("shutil.copyfile", f"{med['copy'][0]:.3f}", f"{result['copy_mb_s']}", "")
    Console().print(table)
    Console().print(f"RSS over baseline: {result['inject_rss_over_baseline_mib']} MiB; "
                    f"throughput vs plain copy: {result['inject_vs_copy_throughput']}x -> {args.out}")


if __name__ == "__main__":
    main()
