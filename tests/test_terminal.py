"""The terminal: servers stop without a traceback, waits show progress, known noise stays out.

Stand-in processes, not vLLM (the real server runs in tests/test_serve_chain.py): what is under test is the
launcher's side, which signal goes where and what it prints."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mtpquant.serving.serve import Launch, Server, last_line

# A server that, like `vllm serve`, stops its engine child itself on SIGINT and exits 0; on SIGTERM to the
# whole group (the old shutdown) the child dies under it first.
SERVER = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
def on_int(*_):
    child.terminate(); child.wait(); print("clean shutdown", flush=True); sys.exit(0)
signal.signal(signal.SIGINT, on_int)
print("INFO loading weights", flush=True)
print("ready", flush=True)
time.sleep(600)
"""


def _server(tmp_path: Path, code: str) -> Server:
    server = Server(Launch([sys.executable, "-c", code], {}, Path("/nonexistent"), "m", "127.0.0.1", 1, 0),
                    tmp_path / "serve.log")
    server.start()
    deadline = time.monotonic() + 30
    while last_line(server.log_path) != "ready" and time.monotonic() < deadline:  # the command heads the log
        time.sleep(0.1)
    return server


def test_stop_sends_sigint_to_the_server_which_stops_its_engine(tmp_path):
    server = _server(tmp_path, SERVER)
    assert server.stop(grace_s=10) == 0
    assert "clean shutdown" in server.log_path.read_text()
    assert "Traceback" not in server.log_path.read_text()


def test_a_server_that_ignores_sigint_is_terminated(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); " \
           "time.sleep(600)"
    server = _server(tmp_path, code)
    t0 = time.monotonic()
    assert server.stop(grace_s=1) is not None
    assert server.proc.poll() is not None and time.monotonic() - t0 < 10


def test_last_line_is_the_logs_last_nonempty_line(tmp_path):
    log = tmp_path / "x.log"
    assert last_line(log) == ""
    log.write_text("x" * 10000 + "\nINFO Loading weights took 3.2 s\n\n")
    assert last_line(log) == "INFO Loading weights took 3.2 s"


def test_stdout_to_keeps_a_librarys_printout_in_its_log(tmp_path, capfd):
    import os

    from mtpquant.core.quiet import stdout_to

    log = tmp_path / "bench" / "client.log"
    print("before")
    with stdout_to(log):
        print("Namespace(backend='openai', ...)")
        os.write(1, b"install termplotlib to plot\n")  # what a logging handler holding the real stdout writes
        sys.stderr.write("progress stays\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "before\nafter\n" and "progress stays" in err
    assert sorted(log.read_text().splitlines()) == ["Namespace(backend='openai', ...)", "install termplotlib to plot"]


def test_a_wait_inside_a_progress_is_a_line_of_the_same_display():
    from mtpquant.core import progress as p

    with p.progress("bench points", total=3) as update:
        bar = p._active[0]
        with p.progress("vLLM starting m (timeout 60 s)") as inner:
            inner(status="INFO loading weights " + "x" * 300)
            assert len(bar.tasks) == 2 and bar.tasks[1].fields["status"].endswith("…")
            assert len(bar.tasks[1].fields["status"]) == p.STATUS_CHARS
        update(advance=1)
        assert len(bar.tasks) == 1 and bar.tasks[0].fields["count"] == "1/3"
    assert not p._active


REPORT = ("Glm4MoeForCausalLM LOAD REPORT from: /run/base\nKey                               | Status     | \n"
          "----------------------------------+------------+-\n"
          "model.layers.3.eh_proj.weight     | \x1b[38;5;208mUNEXPECTED\x1b[0m | \n"
          "model.layers.3.mlp.experts.{0...7}.up_proj.weight | UNEXPECTED | \n{rest}\n"
          "Notes:\n- UNEXPECTED:\tcan be ignored")


def report(rest: str) -> str:
    """transformers 5's load report (utils/loading_report.py): a Key | Status table, then notes."""
    return REPORT.replace("{rest}", rest)


def test_mtp_only_load_report_is_recognized_and_nothing_else():
    from mtpquant.core.quiet import mtp_only_load_report

    prefixes = ("model.layers.3.",)
    assert mtp_only_load_report(report(""), prefixes)
    assert mtp_only_load_report(report("model.layers.3.ml...ht | UNEXPECTED | "), prefixes)  # compact table
    assert not mtp_only_load_report(report("model.la...ht | UNEXPECTED | "), prefixes)  # cannot tell: shown
    assert not mtp_only_load_report(report("model.layers.1.mlp.gate.weight | UNEXPECTED | "), prefixes)
    assert not mtp_only_load_report(report("lm_head.weight | MISSING | "), prefixes)
    assert not mtp_only_load_report(report(""), ())


STAGE = """
import json, sys
from loguru import logger
from transformers.utils import logging as tlog
from mtpquant.core.quiet import stage_logs
sys.path.insert(0, sys.argv[2])
from test_terminal import report
said = []
with stage_logs(sys.argv[1], ["model.layers.3."], 70, said.append):
    for _ in range(3):
        logger.log("METRIC", "time 0.12s")
    logger.warning("No accelerator available! Compressing model on CPU instead")
    logger.warning("Could not find MTP weights with prefix mtp")
    logger.info("Compression lifecycle initialized")
    logger.warning("a new warning")
    logger.warning("MoE is being linearized after loading in order to support efficient calibration")
    import warnings
    warnings.warn("Attempting to save a model with offloaded modules. Ensure that ...")
    warnings.warn("a new python warning")
    import logging, torch  # torch's logging configuration: its "torch" handler prints W1202 ... lines on stderr
    logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing will return true for both fx.symbolic_trace")
    logger.warning("Disabling tokenizer parallelism due to threading conflict between FastTokenizer and Datasets")
    tlog.get_logger("transformers.modeling_utils").warning(report(""))
    tlog.get_logger("transformers.modeling_utils").warning(report("lm_head.weight | MISSING | "))
print(json.dumps(said))
"""


def test_stage_logs_keep_known_noise_in_the_log_and_say_it_once(tmp_path):
    """In a fresh interpreter, as a stage runs: the loggers' handlers are the process's own (inside pytest,
    earlier tests' handlers may hold another stderr)."""
    import json
    import os
    import subprocess

    import pytest

    pytest.importorskip("llmcompressor")
    log = tmp_path / "quantize.log"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", STAGE, str(log), str(Path(__file__).parent)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    err, said = r.stderr, json.loads(r.stdout.splitlines()[-1])
    assert "a new warning" in err and "a new python warning" in err and "lm_head.weight" in err  # news shown
    for noise in ("METRIC", "No accelerator", "Could not find MTP", "lifecycle", "eh_proj", "linearized",
                  "offloaded modules", "is_fx_tracing", "tokenizer parallelism"):
        assert noise not in err.replace(report("lm_head.weight | MISSING | "), ""), noise
        assert noise not in r.stdout, noise  # llm-compressor's own sink prints on stdout as it is imported
    text = log.read_text()
    assert text.count("time 0.12s") == 3 and "No accelerator" in text and "Could not find MTP" in text
    assert "linearized" in text and "offloaded modules" in text
    assert "eh_proj" in text and "lifecycle" in text
    assert "is_fx_tracing will return true" in text and "Disabling tokenizer parallelism" in text
    assert said[0] == "70 MTP tensors not loaded by transformers (expected: inject-mtp copies them back)"
    assert "inject-mtp copies them from the base" in said[1] and str(log) in said[2]


def test_the_bench_client_line_is_the_one_that_runs_on_the_platform():
    from mtpquant.serving.bench import client_command

    args = ["--backend", "openai", "--base-url", "http://127.0.0.1:8000"]
    assert client_command(["vllm", "serve", "/m"], args) == "vllm bench serve --backend openai --base-url " \
        "http://127.0.0.1:8000"
    assert client_command(["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"], args) == \
        "/venv/bin/python -m mtpquant.serving.bench --backend openai --base-url http://127.0.0.1:8000"


def test_the_test_heartbeat_names_a_slow_test_every_interval_and_nothing_for_a_quick_one():
    from tests.heartbeat import Heartbeat

    now = [100.0]
    hb = Heartbeat(every_s=5, clock=lambda: now[0])
    hb.begin("tests/test_x.py::test_quick")
    now[0] = 104.9
    assert hb.tick() is None  # under the interval: the dot that follows is output enough
    hb.end()
    now[0] = 200.0
    assert hb.tick() is None  # between tests nothing runs
    hb.begin("tests/test_x.py::test_slow")
    lines = []
    for t in range(201, 223):
        now[0] = float(t)
        lines.append(hb.tick())
    said = [x for x in lines if x]
    expected = [f"... tests/test_x.py::test_slow still running ({s} s)" for s in (5, 10, 15, 20)]
    assert [x.strip() for x in said] == expected
    assert said[0].startswith("\n") and not said[1].startswith("\n")  # only the first ends the line of dots
    assert all(x.endswith("\n") for x in said)


def test_the_heartbeat_reaches_the_terminal_not_the_tests_captured_output(tmp_path):
    """A real pytest run with fd capture: a 3 s test under a 1 s heartbeat prints its lines on pytest's stdout."""
    import os
    import subprocess

    (tmp_path / "test_sleep.py").write_text("import time\ndef test_sleeps():\n    time.sleep(3)\n")
    (tmp_path / "conftest.py").write_text(
        "import os\nfrom tests.heartbeat import Beater, Heartbeat\nHB = Heartbeat(every_s=1)\n"
        "def pytest_configure(config):\n    config._b = Beater(HB, os.dup(1)); config._b.thread.start()\n"
        "def pytest_unconfigure(config):\n    config._b.close()\n"
        "def pytest_runtest_logstart(nodeid, location):\n    HB.begin(nodeid)\n"
        "def pytest_runtest_logfinish(nodeid, location):\n    HB.end()\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          "-c", os.devnull, str(tmp_path / "test_sleep.py")], capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": str(root)}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test_sleep.py::test_sleeps still running (1 s)" in out.stdout
    assert "still running (2 s)" in out.stdout


def test_eval_imports_lm_eval_and_indexes_its_tasks_under_a_spinner(tmp_path, monkeypatch):
    """After vLLM is ready, `import lm_eval` and TaskManager() took 21 s with nothing on the terminal (fresh
    demo, 2026-12-02): both must happen while a progress display is up. A stand-in lm_eval records it."""
    import pytest

    from mtpquant.model import recipes
    from mtpquant.serving.evaluate import run_lm_eval

    pkg = tmp_path / "lm_eval"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from mtpquant.core import progress\nUNDER_SPINNER = bool(progress._active)\n"
                                     "def simple_evaluate(**kw):\n    raise RuntimeError('stand-in stops here')\n")
    (pkg / "tasks.py").write_text("from mtpquant.core import progress\nclass TaskManager:\n"
                                  "    def __init__(self, include_path=None):\n"
                                  "        TaskManager.under_spinner = bool(progress._active)\n")
    for m in ("lm_eval", "lm_eval.tasks"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="stand-in"):
        run_lm_eval(recipes.load("eval", "tiny"), "http://127.0.0.1:9", "m", "tok", log=lambda *a: None)
    assert sys.modules["lm_eval"].UNDER_SPINNER
    assert sys.modules["lm_eval.tasks"].TaskManager.under_spinner


def test_the_dequantized_copy_is_made_under_a_spinner(tmp_path, monkeypatch):
    """`eval`/`bench` of a W4A16 artifact on the CPU profile first write its BF16 copy: 22 s with nothing on the
    terminal in the fresh demo (2026-12-02), between nox's command line and the DEQUANTIZED note."""
    import json

    from mtpquant.core import progress as progress_mod
    from mtpquant.model import dequantize
    from mtpquant.serving.serve import load_profile, model_for

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    seen = []

    def fake(src, out):
        seen.append(bool(progress_mod._active))
        return out

    monkeypatch.setattr(dequantize, "is_current", lambda out, src: False)
    monkeypatch.setattr(dequantize, "dequantize_artifact", fake)
    profile = load_profile("cpu")
    assert profile.dequantize
    assert model_for(profile, artifact, tmp_path / "copy") == tmp_path / "copy"
    assert seen == [True]
