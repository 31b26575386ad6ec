"""`report`: one markdown report per artifact (RUN/report.md), from the run's own records.

Sections: what the artifact is (manifest: files, hashes, package versions, pins), verify checks, eval results
of every label in RUN/eval/ side by side (stderr, MTP acceptance on eval traffic, the references of the suite),
the bench table and plot with the MTP speed ratio measured side by side in one run, and commands a user can
paste: the `mtpquant` stages with the run dir, eval and bench as they were given, one bench point by hand (the
server on its profile's port and the benchmark client line that runs on that platform), then the vLLM lines the
launcher ran. Missing parts are said to be missing.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_write_bytes
from mtpquant.core.errors import MtpquantError
from mtpquant.core.run import MANIFEST, Run, load_json, manifest_of
from mtpquant.model import recipes
from mtpquant.model.schemes import label_of


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
        from mtpquant.serving.evaluate import compare_logprobs

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


def _cmd(*words: Any) -> str:
    return shlex.join(str(w) for w in words if w is not None)


def stage_commands(run: Run) -> list[str]:
    """The artifact chain as the user types it, from the records (in the calibration environment)."""
    out = []
    prep, quant = run.read_record("prepare"), run.read_record("quantize")
    if prep:
        out.append(_cmd("mtpquant", "prepare", "--run", run.root, "--model", prep["recipe"]))
    if quant:
        engine = ["--engine", "stream"] if quant.get("engine") == "stream" else []
        out.append(_cmd("mtpquant", "quantize", "--run", run.root, "--recipe", quant["recipe"]["path"],
                        "--calibration", quant["calibration"]["path"], *engine))
    for stage in ("inject-mtp", "verify"):
        if run.read_record(stage) is not None:
            out.append(_cmd("mtpquant", stage, "--run", run.root))
    if (run.read_record("verify") or {}).get("ok") and manifest_of(run.artifact).is_file():
        out.append(_cmd("mtpquant", "manifest", "--run", run.root))
    return out


def _opt(flag: str, value: Any) -> list[Any]:
    return [flag, value] if value else []


def eval_commands(run: Run) -> list[str]:
    out = []
    for p in run.eval_results():
        inv = (load_json(p) or {}).get("invocation")
        if inv:
            out.append(_cmd(inv["python"], "-m", "mtpquant", "eval", "--run", run.root, "--artifact", inv["artifact"],
                            *_opt("--name", inv.get("name")), "--label", inv["label"], "--suite", inv["suite"],
                            "--profile", inv["profile"], *(["--no-mtp"] if inv.get("no_mtp") else []),
                            *_opt("--base-url", inv.get("base_url")), *_opt("--tokenizer", inv.get("tokenizer"))))
    return out


def bench_commands(run: Run, b: dict[str, Any]) -> list[str]:
    """`mtpquant bench` as given, then one point by hand: the server on its profile's port (`mtpquant serve`)
    and the client line that runs on that platform, pointed at it."""
    inv = b.get("invocation")
    if not inv:
        return []
    out = [_cmd(inv["python"], "-m", "mtpquant", "bench", "--run", run.root, "--artifact", inv["artifact"],
                *_opt("--name", inv.get("name")), "--grid", inv["grid"], "--profile", inv["profile"])]
    point = next((pt for pt in b.get("points", []) if pt.get("mtp") and pt.get("command")), None)
    if point:
        port = recipes.load("serve", inv["profile"]).port
        out += ["", f"# one point by hand: serve on port {port}, then the benchmark client in another shell",
                _cmd(inv["python"], "-m", "mtpquant", "serve", "--run", run.root, "--artifact", inv["artifact"],
                     *_opt("--name", inv.get("name")), "--profile", inv["profile"]),
                re.sub(r"--base-url \S+", f"--base-url http://127.0.0.1:{port}", point["command"])]
    return out


def server_commands(run: Run) -> list[str]:
    """The vLLM command lines the launcher ran, each on the port of its profile (eval and bench start theirs on a
    free port that means nothing after the run)."""
    seen: list[str] = []
    serve = run.read_record("serve")
    cmds = [serve["command"]] if serve else []
    for rec in [load_json(p) or {} for p in run.eval_results()]:
        cmds.append(_on_profile_port(rec.get("server", {}).get("command"), rec.get("invocation")))
    b = load_json(run.bench_summary) or {}
    cmds += [_on_profile_port(pt.get("server_command"), b.get("invocation")) for pt in b.get("points", [])]
    for c in cmds:
        if c and c not in seen:
            seen.append(c)
    return seen


def _on_profile_port(command: str | None, invocation: dict[str, Any] | None) -> str | None:
    if not command or not invocation:
        return command
    return re.sub(r"--port \d+", f"--port {recipes.load('serve', invocation['profile']).port}", command)


def section_commands(run: Run) -> list[str]:
    out = ["## Commands", "", "Stages (`mtpquant` is also `python -m mtpquant`; the calibration environment):", "",
           "```", *stage_commands(run), "```", ""]
    b = load_json(run.bench_summary) or {}
    served = eval_commands(run) + (bench_commands(run, b) if b else [])
    if served:
        out += ["Serving, eval and bench (the serving environment's python):", "", "```", *served, "```", ""]
    servers = server_commands(run)
    if servers:
        out += ["The vLLM servers as the launcher started them (what `mtpquant serve` runs):", "", "```",
                *servers, "```", ""]
    return out


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
