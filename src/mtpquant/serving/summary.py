"""`summary`: one rich panel of what the runs found, from their records only (the last screen of `make demo`).

Per run: the verify verdict (the failing checks named), eval accuracy ± stderr with the MTP acceptance on the
eval traffic and the KL against the `bf16` label, the bench table (medians, min-max, verdict) and where
report.md and the plot are. A part a run does not have is left out; a run with no records at all says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mtpquant.core.run import Run, load_json


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def verify_line(run: Run) -> Text | None:
    v = run.read_record("verify")
    if not v:
        return None
    checks = v.get("checks", [])
    failed = [c["name"] for c in checks if not c.get("ok")]
    if v.get("ok"):
        return Text.assemble(("verify ", "bold"), ("PASS", "bold green"), f" ({len(checks)} checks)")
    return Text.assemble(("verify ", "bold"), ("FAIL", "bold red"), ": " + ", ".join(failed))


def mtp_line(run: Run) -> Text | None:
    """What became of the MTP layer: injected by inject-mtp (verify checks it is the base's, byte for byte)."""
    rec = run.read_record("inject-mtp")
    if not rec or "tensors" not in rec:
        return None
    return Text.assemble(("MTP ", "bold"), f"{rec['tensors']} tensors of layer(s) {rec.get('mtp_layers')} "
                         "injected in BF16 from the base")


def eval_results(run: Run) -> list[dict[str, Any]]:
    return [r for r in (load_json(p) for p in run.eval_results()) if r]


def kl_against_bf16(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """label -> compare_logprobs against the `bf16` result, for every other result with answer log-probs."""
    ref = next((r for r in results if r.get("label") == "bf16" and r.get("answer_logprobs")), None)
    if not ref:
        return {}
    from mtpquant.serving.evaluate import compare_logprobs

    return {r["label"]: compare_logprobs(ref["answer_logprobs"], r["answer_logprobs"])
            for r in results if r is not ref and r.get("answer_logprobs")}


def eval_table(results: list[dict[str, Any]]) -> Table | None:
    if not results:
        return None
    kl = kl_against_bf16(results)
    t = Table(title="eval (lm-eval against the served model)", title_justify="left")
    for col in ("model", "task", "accuracy ± stderr", "n", "MTP acceptance", "KL(bf16 ‖ model)", "top-1 flips"):
        t.add_column(col)
    for r in results:
        rate = (r.get("mtp_acceptance") or {}).get("rate")
        c = kl.get(r["label"], {})
        for task in r.get("tasks", []):
            t.add_row(r["label"], task["task"], f"{_fmt(task['value'], '.3f')} ± {_fmt(task.get('stderr'), '.3f')}",
                      str(task.get("n", "-")), "MTP off" if rate is None else f"{rate:.3f}",
                      _fmt(c.get("kl_mean"), ".5f"), _fmt(c.get("top1_flip_rate"), ".4f"))
    return t


def _spread(row: dict[str, Any], key: str, spec: str) -> str:
    lo, hi = row.get(f"{key}_min"), row.get(f"{key}_max")
    span = f" [{lo:{spec}}-{hi:{spec}}]" if lo is not None and hi is not None else ""
    return _fmt(row.get(key), spec) + span


def bench_table(run: Run) -> Table | None:
    b = load_json(run.bench_summary)
    if not b:
        return None
    t = Table(title=f"bench (medians of {b.get('repeats', '?')} interleaved repetitions, \\[min-max])",
              title_justify="left")
    for col in ("concurrency", "tok/s MTP", "tok/s no MTP", "MTP / no MTP", "acceptance", "verdict"):
        t.add_column(col)
    for row in b.get("table", []):
        t.add_row(str(row["concurrency"]), _spread(row, "mtp_output_throughput", ".1f"),
                  _spread(row, "nomtp_output_throughput", ".1f"), _spread(row, "mtp_speedup", ".2f"),
                  f"{_fmt(row.get('acceptance_rate'), '.1f')}%", row.get("verdict", "-"))
    return t


def where_line(run: Run) -> Text | None:
    found = [f"{what} {path}" for what, path in (("report", run.report), ("plot", run.bench_plot))
             if Path(path).is_file()]
    return Text("\n".join(found), style="cyan") if found else None


def run_parts(run: Run) -> list[RenderableType]:
    results = eval_results(run)
    parts = [mtp_line(run), verify_line(run), eval_table(results), bench_table(run), where_line(run)]
    kept = [p for p in parts if p is not None]
    return kept or [Text(f"no records in {run.root}", style="yellow")]


def panel(runs: list[Run]) -> Panel:
    body: list[RenderableType] = []
    for run in runs:
        body += [Text(str(run.root), style="bold underline"), *run_parts(run), Text("")]
    return Panel(Group(*body[:-1]), title="[bold]mtpquant summary[/]", expand=False)


def summary_command(runs: list[Path], console: Any) -> int:
    console.print(panel([Run(r) for r in runs]))
    return 0
