"""`mtpquant summary`: the demo's last screen, from run directories whose records are written by their own
writers (Run.record, the eval result and bench.json paths Run names); numbers made up, shapes real."""

from __future__ import annotations

from pathlib import Path

from mtpquant.cli import main
from mtpquant.core.atomic import atomic_write_bytes, atomic_write_json
from mtpquant.core.run import Run
from mtpquant.serving.bench import summarize
from mtpquant.serving.report import write_report


def eval_record(label: str, value: float, rate: float | None, logprobs: list) -> dict:
    acc = None if rate is None else {"draft_tokens": 100.0, "accepted_tokens": 100 * rate, "rate": rate}
    return {"label": label, "suite": "tiny", "mtp_acceptance": acc, "answer_logprobs": logprobs,
            "tasks": [{"task": "tiny_arith", "metric": "exact_match,strict-match", "value": value,
                       "stderr": 0.024, "n": 200, "reference": {}}]}


def bench_record() -> dict:
    def point(mtp: bool, rep: int, tok_s: float) -> dict:
        res = {"output_throughput": tok_s}
        if mtp:
            res |= {"spec_decode_acceptance_rate": 94.0, "spec_decode_acceptance_length": 1.94}
        return {"mtp": mtp, "concurrency": 1, "repeat": rep, "result": res}

    points = [point(True, r, 40.0 + r) for r in range(3)] + [point(False, r, 39.0 + 2 * r) for r in range(3)]
    return {"grid": "tiny", "repeats": 3, "points": points, "table": summarize(points)}


def full_run(root: Path) -> Run:
    run = Run(root)
    run.root.mkdir()
    run.record("inject-mtp", {"tensors": 31, "mtp_layers": [3]})
    run.record("verify", {"ok": True, "checks": [{"name": "mtp", "ok": True, "detail": "", "failures": []}] * 9})
    ref = [[{"a": -0.1, "b": -2.4}]]
    atomic_write_json(run.eval_result("bf16"), eval_record("bf16", 0.865, None, ref))
    atomic_write_json(run.eval_result("w4a16-mtp"), eval_record("w4a16-mtp", 0.845, 0.938, [[{"a": -0.2, "b": -1.7}]]))
    atomic_write_json(run.bench_summary, bench_record())
    atomic_write_bytes(run.bench_plot, b"\x89PNG")
    write_report(run)
    return run


def test_summary_panel_has_every_finding(tmp_path, capsys):
    run = full_run(tmp_path / "arith")
    failed = Run(tmp_path / "glm5")
    failed.root.mkdir()
    failed.record("verify", {"ok": False, "checks": [{"name": "mtp sha256", "ok": False, "detail": "",
                                                      "failures": ["model.layers.3.eh_proj.weight"]}]})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["summary", "--run", str(run.root), "--run", str(failed.root), "--run", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "mtpquant summary" in out
    assert "MTP 31 tensors of layer(s) [3] injected in BF16 from the base" in out
    assert "verify PASS (9 checks)" in out and "verify FAIL: mtp sha256" in out
    assert "0.865 ± 0.024" in out and "0.845 ± 0.024" in out
    assert "0.938" in out and "MTP off" in out
    assert "0.0" in out and "KL(bf16" in out  # the KL column, a number for w4a16-mtp
    assert "[min-max]" in out and "41.0 [40.0-42.0]" in out and "1.00 [0.98-1.03]" in out
    assert "within noise" in out
    assert f"report {run.report}" in out and f"plot {run.bench_plot}" in out
    assert f"no records in {empty}" in out.replace("\n", "")


def test_summary_refuses_a_missing_run(tmp_path, capsys):
    assert main(["summary", "--run", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_report_commands_are_pasteable(tmp_path):
    """Stage commands with the run dir, eval and bench as given, a bench point by hand against a server on the
    profile's port: no port that only existed during the run."""
    run = full_run(tmp_path / "arith")
    run.record("prepare", {"recipe": "/repo/recipes/models/tiny-arith.yaml"})
    run.record("quantize", {"recipe": {"path": "/repo/recipes/quant/w4a16-asym-g128.yaml"},
                            "calibration": {"path": "/repo/recipes/calibration/tiny-arith.yaml"}})
    py = "/venv/bin/python"
    rec = eval_record("bf16", 0.865, None, [])
    rec |= {"invocation": {"python": py, "artifact": str(run.base), "name": "bf16", "label": "bf16",
                           "suite": "tiny", "profile": "cpu", "no_mtp": False, "base_url": None, "tokenizer": None},
            "server": {"command": f"{py} -m vllm.entrypoints.openai.api_server --model M --port 41234"}}
    atomic_write_json(run.eval_result("bf16"), rec)
    b = bench_record()
    b["invocation"] = {"python": py, "artifact": str(run.artifact), "name": "w4a16", "grid": "tiny",
                       "profile": "cpu"}
    for pt in b["points"]:
        pt["server_command"] = f"{py} -m vllm.entrypoints.openai.api_server --model M --port 41235"
        pt["command"] = f"{py} -m mtpquant.serving.bench --base-url http://127.0.0.1:41235 --model w4a16"
    atomic_write_json(run.bench_summary, b)
    text = write_report(run).read_text()
    commands = text[text.index("## Commands"):]
    assert f"mtpquant prepare --run {run.root} --model /repo/recipes/models/tiny-arith.yaml" in commands
    assert (f"mtpquant quantize --run {run.root} --recipe /repo/recipes/quant/w4a16-asym-g128.yaml "
            "--calibration /repo/recipes/calibration/tiny-arith.yaml") in commands
    assert f"mtpquant inject-mtp --run {run.root}" in commands and f"mtpquant verify --run {run.root}" in commands
    assert (f"{py} -m mtpquant eval --run {run.root} --artifact {run.base} --name bf16 --label bf16 --suite tiny "
            "--profile cpu") in commands
    assert f"{py} -m mtpquant bench --run {run.root} --artifact {run.artifact} --name w4a16 --grid tiny" in commands
    assert f"{py} -m mtpquant serve --run {run.root}" in commands
    assert f"{py} -m mtpquant.serving.bench --base-url http://127.0.0.1:8000 --model w4a16" in commands
    assert "41234" not in commands and "41235" not in commands and "--port 8000" in commands
