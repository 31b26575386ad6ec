"""`report`: one markdown report per artifact (RUN/report.md), from the run's own records.

Sections: what the artifact is (manifest: files, hashes, package versions, pins), verify checks, eval results
of every label in RUN/eval/ side by side (stderr, MTP acceptance on eval traffic, the references of the suite),
the bench table and plot with the MTP speed ratio measured side by side in one run, and the exact commands
(quantize/inject records, vLLM server and `vllm bench serve` lines). Missing parts are said to be missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtpquant.atomic import atomic_write_bytes
from mtpquant.errors import MtpquantError
from mtpquant.run import MANIFEST, Run, load_json, manifest_of
from mtpquant.schemes import label_of


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def section_artifact(artifact: Path) -> list[str]:
    m = load_json(manifest_of(artifact))
    out = ["## Artifact", ""]
    if not m:
        return out + [f"No {MANIFEST} in {artifact} (run `mtpquant manifest`).", ""]
    files = m["files"]
    total = sum(f["bytes"] for f in files.values())
    out += [f"`{artifact}`: {len(files)} files, {total / 2**20:.1f} MiB.", "",
            "| file | bytes | sha256 |", "|---|---|---|"]
    out += [f"| {name} | {f['bytes']} | `{f['sha256'][:16]}…` |" for name, f in sorted(files.items())]
    pb = m.get("produced_by", {})
    out += ["", "Produced with: " + ", ".join(f"{k} {v}" for k, v in sorted(pb.get("packages", {}).items()))
            + f"; Python {pb.get('python', '?')}.", ""]
    if pb.get("pins"):
        out += ["Lockfiles: " + ", ".join(f"`{k}` {v[:12]}" for k, v in sorted(pb["pins"].items())), ""]
    q = pb.get("stages", {}).get("quantize")
    if q:
        out += [f"Quantized {q.get('quantized_linears')} routed-expert Linears with recipe `{q['recipe']['path']}` "
                f"(sha256 {q['recipe']['sha256'][:12]}), calibration `{q['calibration']['path']}` "
                f"({q['calibration'].get('samples')} samples, {q['calibration'].get('tokens')} tokens); "
                f"median GPTQ loss {_fmt(q.get('gptq_loss_median'), '.4g')}, {q['seconds']['total']} s.", ""]
    return out


def section_verify(run: Run) -> list[str]:
    v = run.read_record("verify")
    out = ["## Verify", ""]
    if not v:
        return out + [f"No {run.record_path('verify').name} in the run (run `mtpquant verify`).", ""]
    out += [f"Overall: **{'PASS' if v['ok'] else 'FAIL'}**", "", "| check | result | detail |", "|---|---|---|"]
    for c in v["checks"]:
        detail = c["detail"] if c["ok"] else "; ".join(c["failures"][:3])
        out.append(f"| {c['name']} | {'PASS' if c['ok'] else 'FAIL'} | {detail} |")
    return out + [""]


def section_eval(run: Run) -> list[str]:
    results = [r for r in (load_json(p) for p in run.eval_results()) if r]
    out = ["## Eval (lm-eval against the served endpoint)", ""]
    if not results:
        return out + ["No eval results in RUN/eval/ (run `mtpquant eval`).", ""]
    out += ["| model | task | metric | score ± stderr | n | MTP acceptance (eval traffic) |",
            "|---|---|---|---|---|---|"]
    refs: dict[tuple[str, str], dict[str, float]] = {}
    for r in results:
        acc = r.get("mtp_acceptance") or {}
        rate = acc.get("rate")
        for t in r["tasks"]:
            out.append(f"| {r['label']} | {t['task']} | {t['metric']} | {_fmt(t['value'])} ± {_fmt(t['stderr'])} "
                       f"| {t['n']} | {_fmt(rate, '.3f') if rate is not None else 'MTP off'} |")
            if t.get("reference"):
                refs[(t["task"], t["metric"])] = t["reference"]
    for (task, metric), ref in refs.items():
        out.append("")
        out.append(f"Reference for {task} ({metric}): " + ", ".join(f"{k} {v}" for k, v in ref.items()))
    ref = next((r for r in results if r["label"] == "bf16" and r.get("answer_logprobs")), None)
    if ref:
        from mtpquant.evaluate import compare_logprobs

        out += ["", "Next-token distributions on the reference answers, against `bf16` (teacher-forced, top-20 "
                "log-probabilities from the server):", "",
                "| model | KL(bf16 ‖ model) per token | top-1 flip rate | tokens |", "|---|---|---|---|"]
        for r in results:
            if r.get("answer_logprobs") and r is not ref:
                c = compare_logprobs(ref["answer_logprobs"], r["answer_logprobs"])
                out.append(f"| {r['label']} | {_fmt(c['kl_mean'], '.5f')} | {_fmt(c['top1_flip_rate'], '.4f')} "
                           f"| {c['positions']} |")
    notes = {n for r in results for n in (r.get("server") or {}).get("notes", [])}
    out += [""] + [f"> **{n}**" for n in sorted(notes)] + [""]
    return out


def section_bench(run: Run) -> list[str]:
    b = load_json(run.bench_summary)
    out = ["## Bench (`vllm bench serve`, MTP on and off in one run)", ""]
    if not b:
        return out + ["No bench results in RUN/bench/ (run `mtpquant bench`).", ""]
    md = run.bench_table.read_text() if run.bench_table.is_file() else ""
    out += [md.strip(), "", f"![output tokens/s]({run.bench_plot.relative_to(run.root).as_posix()})", ""]
    for row in b["table"]:
        if row.get("mtp_speedup") is None:
            continue
        rate = _fmt(row.get("acceptance_rate"), ".1f")
        spread = f"{row['mtp_speedup_min']:.2f}-{row['mtp_speedup_max']:.2f}" if row.get("mtp_speedup_min") else "-"
        if row.get("verdict") == "measured":
            out.append(f"- concurrency {row['concurrency']}: MTP gives **{row['mtp_speedup']:.2f}x** the output "
                       f"tokens/s of the same server without MTP (paired repetitions {spread}; acceptance {rate}%)")
        else:  # no sentence states noise or an impossible ratio as a speedup
            out.append(f"- concurrency {row['concurrency']}: MTP / no MTP {row['mtp_speedup']:.2f} "
                       f"(paired repetitions {spread}) is no finding: {row.get('verdict', 'unchecked')} "
                       f"(acceptance {rate}%)")
    return out + [""]


def section_commands(run: Run) -> list[str]:
    out = ["## Commands", "", "```"]
    serve = run.read_record("serve")
    if serve:
        out.append(serve["command"])
    for p in run.eval_results():
        r = load_json(p) or {}
        if r.get("server"):
            out.append(r["server"]["command"])
    b = load_json(run.bench_summary)
    if b:
        seen = []
        for pt in b["points"]:
            for cmd in (pt["server_command"], pt["command"]):
                if cmd not in seen:
                    seen.append(cmd)
        out += seen
    return out + ["```", ""]


def write_report(run: Run, artifact: Path | None = None) -> Path:
    if not run.root.is_dir():
        raise MtpquantError(f"{run.root}: run directory not found")
    artifact = Path(artifact or run.artifact)
    lines = [f"# {artifact.name}: {label_of(artifact)} (routed experts, GPTQ) + BF16 MTP", ""]
    for section in (section_artifact(artifact), section_verify(run), section_eval(run), section_bench(run),
                    section_commands(run)):
        lines += section
    atomic_write_bytes(run.report, "\n".join(lines).encode())
    return run.report
