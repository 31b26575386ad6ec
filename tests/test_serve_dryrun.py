"""Serve profiles and launcher without vLLM: dry-run commands (pinned), recipe validation, readiness failures."""

from __future__ import annotations

import itertools
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mtpquant.model import recipes
from mtpquant.model.recipes import RecipeError
from mtpquant.serving.serve import Launch, ServeError, Server, build_launch, running

ROOT = Path(__file__).resolve().parents[1]
ART = "/models/GLM-5.2-W4A16-MTP"

# ServeProfile field -> the vLLM option it becomes (a value, or a switch present when the field is true)
OPTIONS = {"host": "--host", "port": "--port", "tensor_parallel_size": "--tensor-parallel-size",
           "max_model_len": "--max-model-len", "kv_cache_dtype": "--kv-cache-dtype",
           "gpu_memory_utilization": "--gpu-memory-utilization", "tool_call_parser": "--tool-call-parser",
           "reasoning_parser": "--reasoning-parser"}
SWITCHES = {"enable_expert_parallel": "--enable-expert-parallel",
            "enable_auto_tool_choice": "--enable-auto-tool-choice"}


def split_command(line: str) -> tuple[dict[str, str], list[str], dict[str, str | bool]]:
    """'K=V ... vllm serve MODEL --a 1 --b ...' -> (env, leading words, options)."""
    tokens = shlex.split(line)
    env = dict(t.split("=", 1) for t in itertools.takewhile(lambda t: "=" in t and not t.startswith("-"), tokens))
    rest = tokens[len(env):]
    head = list(itertools.takewhile(lambda t: not t.startswith("--"), rest))
    opts: dict[str, str | bool] = {}
    tail = rest[len(head):]
    for i, t in enumerate(tail):
        if t.startswith("--"):
            nxt = tail[i + 1] if i + 1 < len(tail) else "--"
            opts[t] = True if nxt.startswith("--") else nxt
    return env, head, opts


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtpquant", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})


@pytest.mark.parametrize("profile", ["h200x8", "h200x4"])
def test_gpu_dry_run_passes_every_profile_field_to_vllm(profile):
    p = recipes.load("serve", profile)
    r = cli("serve", "--profile", profile, "--run", "/runs/glm-5.2", "--artifact", ART, "--dry-run")
    assert r.returncode == 0, r.stderr
    env, head, opts = split_command(r.stdout.strip())
    assert env == p.env and head == ["vllm", "serve", ART]
    assert opts.pop("--served-model-name") == Path(ART).name
    assert json.loads(opts.pop("--speculative-config")) == {"method": "mtp",
                                                            "num_speculative_tokens": p.num_speculative_tokens}
    assert opts == {**{flag: str(getattr(p, f)) for f, flag in OPTIONS.items() if getattr(p, f) is not None},
                    **{flag: True for f, flag in SWITCHES.items() if getattr(p, f)}}


def test_gpu_dry_run_without_mtp_drops_only_the_speculative_config():
    args = ("serve", "--profile", "h200x8", "--run", "/r", "--artifact", ART, "--dry-run")
    with_mtp, without = cli(*args), cli(*args, "--no-mtp")
    assert with_mtp.returncode == without.returncode == 0, without.stderr
    env, head, opts = split_command(with_mtp.stdout.strip())
    del opts["--speculative-config"]
    assert split_command(without.stdout.strip()) == (env, head, opts)


def test_cpu_dry_run_serves_the_dequantized_copy_and_says_so():
    r = cli("serve", "--profile", "cpu", "--run", "/runs/t", "--artifact", "/runs/t/artifact", "--dry-run")
    assert r.returncode == 0, r.stderr
    argv = r.stdout.strip()
    assert "-m vllm.entrypoints.openai.api_server --model /runs/t/serve-bf16-artifact" in argv
    assert "'{\"method\":\"mtp\",\"num_speculative_tokens\":1}'" in argv
    assert "DEQUANTIZED" in r.stderr


def test_every_shipped_recipe_of_the_new_kinds_loads():
    for kind in ("serve", "eval", "bench"):
        for path in sorted((ROOT / "recipes" / kind).glob("*.yaml")):
            assert recipes.load(kind, path).name == path.stem


@pytest.mark.parametrize(("text", "needle"), [
    ("name: x\nplatform: gpu\nmax_model_len: 10\ntensor_paralel_size: 8\n", "unknown key 'tensor_paralel_size'"),
    ("name: x\nplatform: tpu\nmax_model_len: 10\n", "platform: 'tpu' is not one of"),
    ("name: x\nplatform: cpu\nmax_model_len: 10\ntensor_parallel_size: 2\n", "takes no tensor parallelism"),
    ("name: x\nplatform: gpu\nmax_model_len: 10\nenable_auto_tool_choice: true\n", "needs tool_call_parser"),
    ("name: x\nplatform: gpu\nmax_model_len: 10\nenv: {A: 1}\n", "env.A: must be str"),
])
def test_bad_serve_profile_is_one_line_naming_the_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as exc:
        recipes.load("serve", p)
    assert needle in str(exc.value) and str(p) in str(exc.value) and "\n" not in str(exc.value)
    r = cli("serve", "--profile", str(p), "--run", str(tmp_path), "--artifact", ART, "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr and needle.split(":")[0] in r.stderr


def test_bench_grid_needs_an_existing_prompt_file(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("name: g\nconcurrency: [1]\ndataset: custom\ndataset_path: data/nope.jsonl\n")
    with pytest.raises(RecipeError, match="dataset_path: file not found"):
        recipes.load("bench", p)


def _launch(argv: list[str]) -> Launch:
    return Launch(argv, {}, Path("/nonexistent"), "m", "127.0.0.1", 1, 0)


def test_a_server_that_dies_while_loading_fails_at_once_with_its_log(tmp_path):
    # A stand-in process (not vLLM): the failure under test is "the server exits before it is ready",
    # which a real vLLM start would take a minute to show.
    log = tmp_path / "serve.log"
    code = ("import sys; print('WARNING can cause errors like `OSError: [Errno 24]`'); "
            "print('(Worker) ERROR [x.py:1] ValueError: weights not initialized: model.layers.3.enorm'); "
            "print('RuntimeError: Engine core initialization failed. See root cause above.'); sys.exit(3)")
    with pytest.raises(ServeError) as exc, running(_launch([sys.executable, "-c", code]), log, timeout_s=60):
        pass
    first_line = str(exc.value).splitlines()[0]
    assert "exited with code 3" in first_line
    assert first_line.endswith(f"ValueError: weights not initialized: model.layers.3.enorm; log {log}:")
    assert "$ " in log.read_text()  # the exact command heads the log


def test_a_server_that_never_answers_times_out_and_is_killed(tmp_path):
    launch = _launch([sys.executable, "-c", "import time; time.sleep(600)"])
    server = Server(launch, tmp_path / "serve.log")
    server.start()
    try:
        with pytest.raises(ServeError, match="not ready after 2 s"):
            server.wait_ready(timeout_s=2, poll_s=0.2)
    finally:
        server.stop(grace_s=5)
    assert server.proc.poll() is not None


def test_build_launch_mtp_override_and_host_mapping():
    prof = recipes.load("serve", "h200x8")
    launch = build_launch(prof, Path(ART), "m", mtp_tokens=5)
    assert "'{\"method\":\"mtp\",\"num_speculative_tokens\":5}'" in launch.shell()
    assert launch.base_url == "http://127.0.0.1:8000"  # polls loopback while serving on 0.0.0.0


def test_gpu_profile_without_expert_parallel_refused_for_asymmetric_int4(tmp_path):
    """The seed's TP scale-sharding wall (vLLM #41511/#50196), encoded: TP without EP is refused."""
    import dataclasses

    from mtpquant.core.errors import MtpquantError

    art = tmp_path / "artifact"
    art.mkdir()
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                      "config_groups": {"g": {"weights": weights}}}}
    (art / "config.json").write_text(json.dumps(config))
    tp_only = dataclasses.replace(recipes.load("serve", "h200x8"), enable_expert_parallel=False)
    with pytest.raises(MtpquantError, match="enable_expert_parallel: must be true"):
        build_launch(tp_only, art, "m")
    assert "--enable-expert-parallel" in build_launch(recipes.load("serve", "h200x8"), art, "m").argv
    weights["symmetric"] = True  # symmetric scales shard correctly: allowed
    (art / "config.json").write_text(json.dumps(config))
    assert "--enable-expert-parallel" not in build_launch(tp_only, art, "m").argv
