"""`mtpquant plan` against the calib_speed measurements: predicted peak GPU memory and oneshot time
(calibration + solve) for each measured point, with the ratio. Targets: memory within 15%, time within 25%.

    python benchmarks/plan_check.py        # reads benchmarks/results/calib_speed_*.json
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Measured from run C's logs (the JSON row was not written: the save outlived its timeout): 2 ranks, E=256,
# 768 x 512, oneshot from "Compression lifecycle reset" 23:33:08.11 to "finalized" 23:33:42.76 on rank 0.
TWO_RANKS = {"file": "logs/calib_speed_h100x4_C_x4-2.log", "run": "C", "experts": 256, "samples": 768, "seq_len": 512,
             "path": "fast", "world_size": 2, "oneshot_s": 34.65, "routed_forward": "grouped_mm", "gpu": "h100",
             "activations": "cpu"}


def gpu_type(device: str) -> str:
    """The planner's GPU type for a result's `device` (torch's device name; runs A-C were all H100)."""
    return "h200" if "H200" in device else "h100"


def recipe_for(path: str, routed_default: str, activations: str) -> Any:
    """The quant recipe a measured path ran with; `activations`: where its activations were (the result's
    `activations_on`), since the shipped recipe's `auto` was `cpu` when runs A-D's plain `fast` ran."""
    from mtpquant.model.recipes import FastExperts, load

    quant = load("quant", "w4a16-asym-g128")
    if path.startswith("baseline"):
        return dataclasses.replace(quant, fast_experts=None)
    fe = dataclasses.replace(quant.fast_experts, routed_forward=routed_default, activations=activations)
    for kv in path.split(":", 1)[1].replace("+", ",").split(",") if ":" in path else []:
        k, v = kv.split("=")
        if k == "sorted_routing":  # the option's name in runs A and B
            k, v = "routed_forward", ("sorted" if v == "true" else "llm_compressor")
        typ = {f.name: f.type for f in dataclasses.fields(FastExperts)}[k]
        fe = dataclasses.replace(fe, **{k: int(v) if typ == "int" else (v == "true") if typ == "bool" else v})
    return dataclasses.replace(quant, fast_experts=fe)


def points() -> list[dict[str, Any]]:
    out = []
    for f in sorted(RESULTS.glob("calib_speed_*.json")):
        run_letter = f.name.split("_")[3]  # calib_speed_<gpu>_<run>_...
        routed = "sorted" if run_letter in ("A", "B") else "grouped_mm"  # runs A and B predate grouped_mm
        for run in json.loads(f.read_text())["runs"]:
            for path, r in run["paths"].items():
                if "error" in r:
                    continue
                out.append({"file": f.name, "run": run_letter, "experts": run["experts"], "samples": run["samples"],
                            "seq_len": run["seq_len"], "path": path, "world_size": r["world_size"],
                            "oneshot_s": r["oneshot_s"], "gpu_peak_gib": r["gpu_peak_allocated_gb"],
                            "routed_forward": routed, "gpu": gpu_type(r.get("device", "")),
                            "load_save_s": r["load_s"] + r["save_s"],
                            "activations": "cpu" if r.get("activations_on", "cpu") == "cpu" else "gpu"})
    return [*out, TWO_RANKS]


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from mtpquant.calib.calib_cost import shape_from_config
    from mtpquant.calib.plan import GPUSpec, plan_for_shape
    from mtpquant.tiny.shaped_fixture import glm5_config

    rows = []
    for pt in points():
        shape = shape_from_config(glm5_config(num_experts=pt["experts"]).to_dict())
        quant = recipe_for(pt["path"], pt["routed_forward"], pt["activations"])
        gpus = GPUSpec.of(pt["gpu"], pt["world_size"])
        plan = plan_for_shape("bench", shape, pt["samples"], pt["seq_len"], quant, gpus)
        pred_t = plan.seconds["calibration"] + plan.seconds["solve"]
        row = {**pt, "pred_oneshot_s": pred_t, "time_ratio": pred_t / pt["oneshot_s"]}
        if "load_save_s" in pt:
            row["pred_load_save_s"] = plan.seconds["load"] + plan.seconds["save"]
            row["load_save_ratio"] = row["pred_load_save_s"] / pt["load_save_s"]
        if "gpu_peak_gib" in pt:
            row["pred_gpu_peak_gib"] = plan.subgraphs[1].gpu_peak_gib
            row["memory_ratio"] = row["pred_gpu_peak_gib"] / pt["gpu_peak_gib"]
        rows.append(row)
    (RESULTS / "plan_check.json").write_text(json.dumps(rows, indent=1))
    t = Table(title="mtpquant plan vs measured")
    for c in ("run", "GPU", "E", "tokens", "path", "GPUs", "oneshot s", "predicted", "ratio", "peak GiB", "predicted",
              "ratio", "load+save s", "predicted", "ratio"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["run"], r["gpu"], str(r["experts"]),
                  f"{r['samples']}x{r['seq_len']}", r["path"], str(r["world_size"]), f"{r['oneshot_s']:.1f}",
                  f"{r['pred_oneshot_s']:.1f}", f"{r['time_ratio']:.2f}",
                  f"{r['gpu_peak_gib']:.1f}" if "gpu_peak_gib" in r else "-",
                  f"{r['pred_gpu_peak_gib']:.1f}" if "pred_gpu_peak_gib" in r else "-",
                  f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else "-",
                  *((f"{r['load_save_s']:.1f}", f"{r['pred_load_save_s']:.1f}", f"{r['load_save_ratio']:.2f}")
                    if "load_save_s" in r else ("-", "-", "-")))
    Console(width=160).print(t)


if __name__ == "__main__":
    main()
