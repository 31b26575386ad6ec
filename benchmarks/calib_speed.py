"""Calibration speed at real scale: one GLM-5.2-shaped MoE layer, the project's quantize stage against
plain llm-compressor defaults, on the same data and GPU, in one run.

Writes a 2-layer GLM-5.2-shaped checkpoint (real dimensions: hidden 6144, moe_intermediate 2048, top-8,
MLA attention with the indexer; layer 0 dense, layer 1 MoE with `--experts` routed experts; random BF16
weights) and `--samples` random byte-text samples of `--seq-len` tokens, then runs each path in its own
process (clean CUDA context, clean peak-memory counters):

  baseline        llm-compressor 0.14 defaults: linearize_moe, oneshot(GPTQModifier(scheme="W4A16_ASYM"),
                  pipeline="sequential"), save_pretrained(save_compressed=True)
  baseline-tf32   the same with torch.backends.cuda.matmul.allow_tf32 = True
  fast            `mtpquant quantize` with the shipped recipe (its fast_experts section)
  fast:K=V+...    the same with fast_experts fields overridden (e.g. fast:hessian_inputs=fp32,
                  fast:activations=gpu+overlap_weights=true; "+" because "," separates paths)
  stage-plain     `mtpquant quantize` with the shipped recipe minus fast_experts

Each path reports wall time split into load / calibration / solve / save, peak GPU memory, GPTQ loss per
Linear and achieved TFLOP/s against the FLOPs counted in mtpquant.calib.calib_cost. Under torchrun
(`--nproc-per-node N`) the fast paths run data parallel; rank 0 writes the result.

    python benchmarks/calib_speed.py --experts 64 --samples 64 --seq-len 2048 --paths baseline,fast
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quant" / "w4a16-asym-g128.yaml"
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- inputs ------------------------------------------------------------------------------------------


def write_inputs(work: Path, experts: int, samples: int, seq_len: int, small: bool) -> tuple[Path, Path, float]:
    """(checkpoint, calibration recipe, seconds to write the checkpoint); reused when already there."""
    from mtpquant.tiny.shaped_fixture import SMALL_DIMS, glm5_config, write_shaped_checkpoint

    ckpt = work / f"glm5-shaped-e{experts}{'-small' if small else ''}"
    t = time.perf_counter()
    if not (ckpt / "config.json").exists():
        write_shaped_checkpoint(glm5_config(num_experts=experts, **(SMALL_DIMS if small else {})), ckpt)
    t_ckpt = time.perf_counter() - t
    rng = random.Random(0)
    data = work / f"calib-{samples}x{seq_len}.jsonl"
    alphabet = string.ascii_letters + string.digits + " .,;:(){}[]=+-*/_\n"
    with open(data, "w") as fh:
        for _ in range(samples):
            fh.write(json.dumps({"text": "".join(rng.choices(alphabet, k=seq_len))}) + "\n")
    calib = work / f"calib-{samples}x{seq_len}.yaml"
    calib.write_text(json.dumps({
        "name": calib.stem, "num_samples": samples, "max_seq_length": seq_len, "seed": 0,
        "sources": [{"local": str(data), "text_field": "text", "weight": 1}],
    }))
    return ckpt, calib, t_ckpt


def safe(path: str) -> str:
    return path.replace(":", "_").replace(",", "_").replace("+", "_").replace("=", "-")


def quant_recipe(work: Path, path: str) -> Path:
    """The shipped quant recipe, with fast_experts as the path asks."""
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    if path == "stage-plain":
        recipe.pop("fast_experts", None)
    elif ":" in path:
        for kv in path.split(":", 1)[1].split("+"):
            k, v = kv.split("=")
            recipe.setdefault("fast_experts", {})[k] = yaml.safe_load(v)
    out = work / f"quant-{safe(path)}.yaml"
    out.write_text(yaml.safe_dump(recipe))
    return out


# ---- one path, in its own process ---------------------------------------------------------------------


class PipelineTimer:
    """Synchronized wall time of the sequential pipeline's phases, through llm-compressor's own functions:
    tracing, the activation cache, each subgraph's calibration and propagation pass, and each sequential-
    epoch end (where GPTQ solves). Calibration = oneshot minus the epoch ends."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self._undo: list[Any] = []

    def _patch(self, owner: Any, name: str, wrapper: Any) -> None:
        orig = owner.__dict__[name]
        self._undo.append((owner, name, orig))
        setattr(owner, name, wrapper(orig))

    def __enter__(self) -> PipelineTimer:
        import llmcompressor.pipelines.sequential.pipeline as seq
        from llmcompressor.core import LifecycleCallbacks

        spans = self.spans

        def timed(label: str, fn: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                sync()
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                sync()
                spans.append((label, t0, time.perf_counter()))
                return out
            return run

        def epoch(orig: Any) -> Any:
            return classmethod(timed("solve", orig.__func__))

        def batches(orig: Any) -> Any:
            def gen(activations: Any, num_batches: int, input_names: Any, desc: str, *a: Any) -> Any:
                sync()
                t0 = time.perf_counter()
                yield from orig(activations, num_batches, input_names, desc, *a)
                sync()
                spans.append((desc.replace(":", "").replace("(", "").replace(")", ""), t0, time.perf_counter()))
            return gen

        self._patch(LifecycleCallbacks, "sequential_epoch_end", epoch)
        self._patch(seq, "_get_batches", batches)
        self._patch(seq, "trace_subgraphs", lambda orig: timed("trace", orig))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)

    @property
    def solve_s(self) -> float:
        return sum(b - a for label, a, b in self.spans if label == "solve")


def run_baseline(ckpt: Path, calib_yaml: Path, out: Path, tf32: bool) -> dict[str, Any]:
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.gptq import GPTQModifier

    from mtpquant.calib.calibration import build_dataset
    from mtpquant.calib.quantize import recording_gptq
    from mtpquant.model import recipes

    torch.backends.cuda.matmul.allow_tf32 = tf32
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = transformers.GlmMoeDsaForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    linearize_moe(model)
    calib = recipes.load("calibration", calib_yaml)
    ds, _ = build_dataset(calib, tok, str(calib_yaml))
    t1 = time.perf_counter()
    with recording_gptq(model) as rec:
        oneshot(model=model, processor=tok, dataset=ds, pipeline="sequential",
                recipe=GPTQModifier(targets=[r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"],
                                    scheme="W4A16_ASYM", ignore=["lm_head"]),
                num_calibration_samples=calib.num_samples, max_seq_length=calib.max_seq_length,
                shuffle_calibration_samples=False)
    t2 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "oneshot_s": t2 - t1, "save_s": t3 - t2, "per_linear": rec.rows}


def run_stage(ckpt: Path, quant_yaml: Path, calib_yaml: Path, out: Path) -> dict[str, Any]:
    from mtpquant.calib.quantize import quantize
    from mtpquant.core.atomic import atomic_write_json

    rep = quantize(ckpt, str(quant_yaml), str(calib_yaml), out)
    if rep["rank"] == 0:
        atomic_write_json(out.with_suffix(".json"), rep)
    s = rep["seconds"]
    return {"load_s": s["load"], "oneshot_s": s["calibrate_and_solve"], "save_s": s["save"],
            "per_linear": rep["per_linear"], "expert_gptq_s": s.get("expert_gptq", {}),
            "activations_on": rep.get("activations_on", "cpu")}


def child(args: argparse.Namespace) -> None:
    import torch

    rank = int(os.environ.get("RANK", "0"))
    work = Path(args.work)
    ckpt, calib_yaml = Path(args.ckpt), Path(args.calib)
    out = work / f"out-{safe(args.run_one)}"
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with PipelineTimer() as timer:
        if args.run_one.startswith("baseline"):
            res = run_baseline(ckpt, calib_yaml, out, tf32=args.run_one == "baseline-tf32")
        else:
            res = run_stage(ckpt, quant_recipe(work, args.run_one), calib_yaml, out)
    res["total_s"] = time.perf_counter() - t
    res["solve_s"] = timer.solve_s
    res["calibration_s"] = res["oneshot_s"] - timer.solve_s
    res["phases"] = [(label, round(a - t, 3), round(b - a, 3)) for label, a, b in timer.spans]
    res["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    res["gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
    res["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    res["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        Path(args.json).write_text(json.dumps(res))


# ---- the parent: inputs, children, table ------------------------------------------------------------


def flop_summary(experts: int, tokens: int, res: dict[str, Any], path: str, small: bool) -> dict[str, float]:
    from mtpquant.calib.calib_cost import shape_from_config
    from mtpquant.tiny.shaped_fixture import SMALL_DIMS, glm5_config

    shape = shape_from_config(glm5_config(num_experts=experts, **(SMALL_DIMS if small else {})).to_dict())
    fast = not path.startswith("baseline") and path != "stage-plain"
    calib = sum((shape.fast_calib_flops() if fast else shape.baseline_calib_flops()).values()) * tokens
    solve = sum(shape.solve_flops(fast).values())
    floor = sum(shape.fast_calib_flops().values()) * tokens
    return {"calib_tflop": calib / 1e12, "solve_tflop": solve / 1e12, "floor_calib_tflop": floor / 1e12,
            "calib_tflops_achieved": calib / 1e12 / res["calibration_s"],
            "floor_over_calibration_tflops": floor / 1e12 / res["calibration_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--paths", default="baseline,fast")
    ap.add_argument("--work", default="/tmp/calib-speed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calib_speed.json"))
    ap.add_argument("--nproc", type=int, default=1, help="GPUs for the fast paths (torchrun, data parallel)")
    ap.add_argument("--small", action="store_true", help="fixture dimensions (debug the same code on a CPU)")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.experts < 8:
        ap.error("--experts: GLM-5.2 routes each token to 8 experts; give at least 8")
    if args.run_one:
        return child(args)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, calib, t_ckpt = write_inputs(work, args.experts, args.samples, args.seq_len, args.small)
    tokens = args.samples * args.seq_len
    results: dict[str, Any] = {"experts": args.experts, "samples": args.samples, "seq_len": args.seq_len,
                               "tokens": tokens, "checkpoint_write_s": round(t_ckpt, 1), "small": args.small,
                               "paths": {}}
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {"runs": []}
    prev["runs"].append(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for path in args.paths.split(","):
        js = work / "child.json"
        js.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", path, "--ckpt", str(ckpt),
               "--calib", str(calib), "--json", str(js), "--work", str(work)]
        nproc = args.nproc if not path.startswith("baseline") else 1
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *cmd[1:]]
        print(f"== {path} (x{nproc})", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not js.exists():
            results["paths"][path] = {"error": f"exit {proc.returncode}"}
            Path(args.out).write_text(json.dumps(prev, indent=1))
            continue
        shutil.rmtree(work / f"out-{safe(path)}", ignore_errors=True)  # keep the disk for the next path
        res = json.loads(js.read_text())
        res.update(flop_summary(args.experts, tokens, res, path, args.small))
        results["paths"][path] = res
        print_row(path, res)
        summarize(results)
        Path(args.out).write_text(json.dumps(prev, indent=1))  # after every path: a killed run keeps its rows
    print_table(results)


def losses(res: dict[str, Any]) -> dict[str, float]:
    return {r["module"]: r["loss"] for r in res.get("per_linear", []) if r["loss"] is not None}


def summarize(results: dict[str, Any]) -> None:
    paths = results["paths"]
    base = paths.get("baseline", {})
    if "error" in base or not base:
        return
    bl = losses(base)
    for name, res in paths.items():
        if "error" in res or name == "baseline":
            continue
        ls = losses(res)
        common = [m for m in bl if m in ls and bl[m] > 0]
        if common:
            ratios = [ls[m] / bl[m] for m in common]
            res["loss_ratio_vs_baseline"] = {"median": statistics.median(ratios), "max": max(ratios),
                                             "min": min(ratios), "linears": len(common)}
        res["speedup_oneshot"] = base["oneshot_s"] / res["oneshot_s"]
        res["speedup_total"] = base["total_s"] / res["total_s"]


def print_row(path: str, r: dict[str, Any]) -> None:
    print(f"{path}: load {r['load_s']:.1f}s calib {r['calibration_s']:.1f}s solve {r['solve_s']:.1f}s "
          f"save {r['save_s']:.1f}s peak {r['gpu_peak_allocated_gb']:.1f} GiB "
          f"{r['calib_tflops_achieved']:.0f} TFLOP/s", flush=True)


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"one GLM-5.2-shaped MoE layer, {results['experts']} experts, {results['samples']} x "
                    f"{results['seq_len']} tokens")
    for c in ("path", "GPUs", "load s", "calib s", "solve s", "save s", "oneshot s", "peak GiB", "TFLOP/s",
              "floor TFLOP/s", "loss/base med", "speedup oneshot", "speedup total"):
        t.add_column(c, justify="right")
    for name, r in results["paths"].items():
        if "error" in r:
            t.add_row(name, r["error"])
            continue
        lr = r.get("loss_ratio_vs_baseline", {}).get("median")
        t.add_row(name, str(r["world_size"]), f"{r['load_s']:.1f}", f"{r['calibration_s']:.1f}",
                  f"{r['solve_s']:.1f}", f"{r['save_s']:.1f}", f"{r['oneshot_s']:.1f}",
                  f"{r['gpu_peak_allocated_gb']:.1f}", f"{r['calib_tflops_achieved']:.0f}",
                  f"{r['floor_over_calibration_tflops']:.0f}", f"{lr:.4f}" if lr else "-",
                  f"{r['speedup_oneshot']:.1f}x" if "speedup_oneshot" in r else "-",
                  f"{r['speedup_total']:.1f}x" if "speedup_total" in r else "-")
    Console(width=200).print(t)


if __name__ == "__main__":
    main()
