"""`eval`: lm-eval against a served OpenAI-compatible endpoint, one suite from recipes/eval/.

The server is the one `serve` starts (same profile, same dequantized copy on CPU) or one already running
(--base-url). Alongside lm-eval's scores this records the MTP acceptance seen on the eval traffic (from the
server's /metrics counters, before and after) and every greedy output (to check that MTP changes nothing).

Output: RUN/eval/<label>.json and a table of ours vs the suite's references with stderr and a verdict:
within noise when |ours - ref| <= 1.96 * sqrt(2) * stderr (the reference's stderr taken equal to ours, since
the seed publishes none).
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mtpquant.core.atomic import atomic_write_json
from mtpquant.core.errors import MtpquantError
from mtpquant.core.progress import loading, progress
from mtpquant.core.run import Run
from mtpquant.model import recipes
from mtpquant.model.recipes import REPO_ROOT, EvalSuite, EvalTask

if TYPE_CHECKING:
    from mtpquant.serving.serve_cli import Target

Z = 1.96


def spec_counters(base_url: str) -> dict[str, float]:
    """vLLM's speculative-decoding counters from /metrics, summed over label sets."""
    from mtpquant.serving.serve import _get

    status, body = _get(f"{base_url}/metrics")
    if status != 200:
        raise MtpquantError(f"{base_url}/metrics answered {status}")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        m = re.match(r"^(vllm:spec_decode_num_(?:accepted|draft)_tokens_total)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def acceptance(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    k_acc, k_draft = "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_draft_tokens_total"
    if k_draft not in after:
        return None
    draft = after[k_draft] - before.get(k_draft, 0.0)
    acc = after.get(k_acc, 0.0) - before.get(k_acc, 0.0)
    return {"draft_tokens": draft, "accepted_tokens": acc, "rate": (acc / draft) if draft else None}


def resolve_task(task: EvalTask, workdir: Path) -> tuple[str, str | None]:
    """(task name, include_path): a local task YAML is copied with data paths made absolute."""
    if not task.task.endswith((".yaml", ".yml")):
        return task.task, None
    src = recipes.kind_dir("eval") / task.task
    if not src.is_file():
        raise MtpquantError(f"recipes/eval: task file not found: {task.task}")
    cfg = yaml.safe_load(src.read_text())
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    for split, rel in files.items():
        p = Path(rel)
        p = p if p.is_absolute() else REPO_ROOT / p
        if not p.is_file():
            raise MtpquantError(f"{src}: dataset_kwargs.data_files.{split}: file not found: {rel}")
        files[split] = str(p)
    out = workdir / src.name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg["task"], str(workdir)


def run_lm_eval(suite: EvalSuite, base_url: str, model: str, tokenizer: str, log: Any = print) -> dict[str, Any]:
    loading("eval", "lm_eval", "lm_eval.tasks")  # 10-60 s on a busy machine, with the server already up
    import lm_eval
    from lm_eval.tasks import TaskManager

    endpoint = "/v1/chat/completions" if suite.model == "local-chat-completions" else "/v1/completions"
    model_args = {"base_url": base_url + endpoint, "model": model, "tokenizer": tokenizer,
                  "tokenizer_backend": "huggingface", "tokenized_requests": False,
                  "num_concurrent": suite.num_concurrent, "max_retries": 3, "timeout": 600}
    results: dict[str, Any] = {"tasks": [], "samples": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for task in suite.tasks:
            name, include = resolve_task(task, Path(tmp))
            log(f"lm-eval {name} ({task.metric}) against {base_url}")
            t0 = time.perf_counter()
            with progress(f"lm-eval {name}") as update:
                update(status="indexing lm-eval's task files")  # TaskManager reads every built-in task YAML
                tm = TaskManager(include_path=include) if include else TaskManager()
                update(status=f"{task.limit or 'all'} problems, {suite.num_concurrent} at a time, against {base_url}")
                out = lm_eval.simple_evaluate(
                    model=suite.model, model_args=model_args, tasks=[name], num_fewshot=task.num_fewshot,
                    limit=task.limit, task_manager=tm, log_samples=True, metadata=task.metadata or None,
                    apply_chat_template=suite.model == "local-chat-completions",
                    gen_kwargs={"max_gen_toks": suite.max_gen_toks} if suite.max_gen_toks else None,
                )
            metric, filt = task.metric.split(",", 1)
            res = out["results"][name]
            value = res.get(task.metric)
            if value is None:
                raise MtpquantError(f"lm-eval reported no {task.metric!r} for {name} (has: {', '.join(res)})")
            stderr = res.get(f"{metric}_stderr,{filt}")
            results["tasks"].append({"task": name, "metric": task.metric, "value": value,
                                     "stderr": stderr if isinstance(stderr, float) else None,
                                     "n": len(out["samples"][name]), "seconds": round(time.perf_counter() - t0, 1),
                                     "reference": task.reference})
            results["samples"][name] = [{"doc_id": s["doc_id"], "output": s["resps"][0][0],
                                         "filtered": s["filtered_resps"][0], "target": s["target"]}
                                        for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
            results["lm_eval_version"] = getattr(lm_eval, "__version__", None)
    return results


def answer_logprobs(base_url: str, model: str, tokenizer: str, rows: list[dict[str, Any]], k: int = 20,
                    workers: int = 8) -> list[list[dict[str, float]]]:
    """Per row, per answer token: the server's top-k next-token log-probabilities, teacher-forced on
    question + reference answer (vLLM's `prompt_logprobs` on /v1/completions)."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)

    def one(row: dict[str, Any]) -> list[dict[str, float]]:
        n_q = len(tok(row["question"], add_special_tokens=False)["input_ids"])
        body = json.dumps({"model": model, "prompt": row["question"] + row["answer"], "max_tokens": 1,
                           "temperature": 0, "prompt_logprobs": k}).encode()
        req = urllib.request.Request(f"{base_url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310 (the endpoint under test)
            plp = json.loads(r.read())["choices"][0]["prompt_logprobs"]
        # entry i is the distribution that predicted token i: keep those predicting answer tokens
        return [{t: v["logprob"] for t, v in entry.items()} for entry in plp[n_q:] if entry]

    out = []
    with ThreadPoolExecutor(workers) as pool, progress("next-token log-probabilities", total=len(rows)) as update:
        for r in pool.map(one, rows):
            out.append(r)
            update(advance=1)
    return out


def compare_logprobs(ref: list[list[dict[str, float]]], test: list[list[dict[str, float]]]) -> dict[str, Any]:
    """KL(ref || test) per token (top-k support; tokens missing from test's top-k get its smallest logprob)
    and the rate at which the top-1 token differs."""
    kls, flips = [], 0
    for r_row, t_row in zip(ref, test, strict=True):
        for r, t in zip(r_row, t_row, strict=True):
            floor = min(t.values())
            kls.append(sum(math.exp(lp) * (lp - t.get(tok, floor)) for tok, lp in r.items()))
            flips += max(r, key=r.get) != max(t, key=t.get)
    n = len(kls)
    return {"positions": n, "kl_mean": sum(kls) / n if n else None, "top1_flip_rate": flips / n if n else None}


def verdict(value: float, stderr: float | None, ref: float) -> str:
    if stderr is None:
        return "no stderr"
    bound = Z * math.sqrt(2) * stderr
    return "within noise" if abs(value - ref) <= bound else ("better" if value > ref else "worse")


def table(result: dict[str, Any], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for col in ("task", "metric", "ours", "reference", "delta", "verdict"):
        t.add_column(col)
    for r in result["tasks"]:
        ours = f"{r['value']:.4f}" + (f" ± {r['stderr']:.4f}" if r["stderr"] is not None else "")
        if not r["reference"]:
            t.add_row(r["task"], r["metric"], ours, "-", "-", "-")
        for label, ref in r["reference"].items():
            t.add_row(r["task"], r["metric"], ours, f"{ref:.3f} ({label})", f"{r['value'] - ref:+.4f}",
                      verdict(r["value"], r["stderr"], ref))
    acc = result.get("mtp_acceptance")
    if acc and acc.get("rate") is not None:
        t.caption = (f"MTP acceptance on eval traffic: {acc['rate']:.3f} ({int(acc['accepted_tokens'])}/"
                     f"{int(acc['draft_tokens'])} draft tokens)")
    return t


def evaluate(suite_ref: str, base_url: str, model: str, tokenizer: str, out: Path, label: str,
             extra: dict[str, Any] | None = None, log: Any = print) -> dict[str, Any]:
    suite: EvalSuite = recipes.load("eval", suite_ref)
    path = recipes.resolve_path("eval", suite_ref)
    before = spec_counters(base_url)
    res = run_lm_eval(suite, base_url, model, tokenizer, log)
    res["mtp_acceptance"] = acceptance(before, spec_counters(base_url))
    if suite.logprob_data:
        rows = [json.loads(line) for line in (REPO_ROOT / suite.logprob_data).read_text().splitlines() if line]
        log(f"next-token log-probabilities on {len(rows)} reference answers")
        res["answer_logprobs"] = answer_logprobs(base_url, model, tokenizer, rows)
    res.update({"suite": suite.name, "suite_sha256": recipes.recipe_sha256("eval", path), "label": label,
                "base_url": base_url, "model": model, **(extra or {})})
    atomic_write_json(out, res)
    return res


@dataclass(frozen=True)
class EvalOptions:
    suite: str = "tiny"  # eval suite name or YAML (recipes/eval/)
    base_url: str | None = None  # an already running server; None: one is started with the target's profile
    tokenizer: str | None = None  # None: the served checkpoint
    mtp: bool = True
    label: str | None = None  # None: the artifact's name (+ "-nomtp")


def invocation_of(target: Target, opts: EvalOptions, artifact: Path, label: str) -> dict[str, Any]:
    """What `mtpquant eval` was given, for the report's pasteable command (no port: a fresh one each run)."""
    return {"python": sys.executable, "artifact": str(artifact), "name": target.name, "label": label,
            "suite": opts.suite, "profile": target.profile, "no_mtp": not opts.mtp,
            "base_url": opts.base_url, "tokenizer": opts.tokenizer}


def eval_command(target: Target, opts: EvalOptions, console: Any) -> int:
    from rich.console import Console

    from mtpquant.serving.serve import free_port, running
    from mtpquant.serving.serve_cli import launch_for, load_profile, print_launch

    run = Run(target.run)
    artifact = target.artifact_dir
    label = opts.label or (artifact.name + ("" if opts.mtp else "-nomtp"))
    out = run.eval_result(label)
    invocation = {"invocation": invocation_of(target, opts, artifact, label)}
    if opts.base_url:
        res = evaluate(opts.suite, opts.base_url.rstrip("/"), target.name or artifact.name,
                       opts.tokenizer or str(artifact), out, label, extra=invocation, log=console.print)
    else:
        launch = launch_for(target, console, port=target.port or free_port(), mtp=opts.mtp)
        print_launch(launch, console)
        with running(launch, run.eval_log(label), load_profile(target.profile).ready_timeout_s) as server:
            res = evaluate(opts.suite, launch.base_url, launch.served_name,
                           opts.tokenizer or str(launch.model_dir), out, label,
                           extra={**invocation,
                                  "server": {"command": launch.shell(), "ready_seconds": server.ready_seconds,
                                             "mtp_tokens": launch.mtp_tokens, "notes": launch.notes,
                                             "model_dir": str(launch.model_dir)}},
                           log=console.print)
    Console().print(table(res, f"eval {res['suite']}: {label}"))
    console.print(f"[green]eval[/] -> {out}")
    return 0
