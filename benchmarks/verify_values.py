"""Time of `verify`'s value check per GB, on GLM-5.2-shaped expert Linears, and the projection for the full model.

Writes a base checkpoint of N experts x (gate, up [2048, 6144], down [6144, 2048]) in BF16 and its W4A16 (INT4,
group 128, asymmetric) packed twin (round-to-nearest qparams, packed by compressed-tensors' own compressor: the
check's cost does not depend on how the values were chosen), then runs `verify.value_errors` on every Linear,
serially (per-Linear seconds) and with the thread pool `verify` uses, alternating the two R times (A B A B).
Usage: python benchmarks/verify_values.py [--experts 8] [--workers 2] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GLM52 = {"moe_layers": 75, "experts": 256, "hidden": 6144, "moe_intermediate": 2048}


def write(root: Path, experts: int, seed: int = 0) -> tuple[Path, Path, list[str], int]:
    import torch
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    from mtpquant.model.schemes import DEFAULT

    args = QuantizationArgs(**DEFAULT.weights_args())
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    g = torch.Generator().manual_seed(seed)
    base, art, mods, nbytes = {}, {}, [], 0
    h, i = GLM52["hidden"], GLM52["moe_intermediate"]
    for e in range(experts):
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            mod = f"model.layers.3.mlp.experts.{e}.{proj}"
            w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            grouped = w.float().reshape(shape[0], shape[1] // 128, 128)
            scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale,
                                                            "weight_zero_point": zp}, scheme)
            base[f"{mod}.weight"] = w
            art.update({f"{mod}.{k}": v.contiguous() for k, v in packed.items()})
            mods.append(mod)
            nbytes += w.numel() * 2 + sum(v.numel() * v.element_size() for v in packed.values())
    for d, tensors in (("base", base), ("artifact", art)):
        (root / d).mkdir()
        save_file(tensors, str(root / d / "model.safetensors"))
    return root / "artifact", root / "base", mods, nbytes


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    from mtpquant.chain.verify import value_errors
    from mtpquant.core.checkpoint import Checkpoint
    from mtpquant.model.schemes import DEFAULT as scheme

    with tempfile.TemporaryDirectory() as d:
        art_dir, base_dir, mods, nbytes = write(Path(d), a.experts)
        art, base = Checkpoint(art_dir), Checkpoint(base_dir)
        serial, parallel, per_linear = [], [], []
        for _ in range(a.rounds):  # A B A B: serial and pooled alternate, so load on the machine hits both
            t0 = time.perf_counter()
            for m in mods:
                t = time.perf_counter()
                value_errors(m, art, base, scheme)
                per_linear.append(time.perf_counter() - t)
            serial.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(a.workers) as pool:
                list(pool.map(lambda m: value_errors(m, art, base, scheme), mods))
            parallel.append(time.perf_counter() - t0)
    gb = nbytes / 1e9
    linears = GLM52["moe_layers"] * GLM52["experts"] * 3
    med_par = statistics.median(parallel)
    out = {
        "linears": len(mods), "gb_read": round(gb, 3), "workers": a.workers, "cpus": os.cpu_count(),
        "rounds": a.rounds, "serial_s": [round(x, 2) for x in serial], "pooled_s": [round(x, 2) for x in parallel],
        "per_linear_s": {"median": round(statistics.median(per_linear), 4), "min": round(min(per_linear), 4),
                         "max": round(max(per_linear), 4)},
        "pooled_gb_per_s": {"median": round(gb / med_par, 3), "min": round(gb / max(parallel), 3),
                            "max": round(gb / min(parallel), 3)},
        "glm52_projection": {
            "linears": linears, "gb": round(gb / len(mods) * linears, 1),
            "hours_at_this_rate": round(gb / len(mods) * linears / (gb / med_par) / 3600, 2),
            "note": "extrapolated linearly in Linears from this machine's pooled rate; not measured on GLM-5.2",
        },
    }
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
