"""Serve profiles and launcher without vLLM: dry-run commands (pinned), recipe validation, readiness failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mtpquant import recipes
from mtpquant.recipes import RecipeError
from mtpquant.serve import Launch, ServeError, Server, build_launch, running

ROOT = Path(__file__).resolve().parents[1]
ART = "/models/GLM-5.2-W4A16-MTP"

H200X8 = ("VLLM_ENGINE_READY_TIMEOUT_S=3600 vllm serve /models/GLM-5.2-W4A16-MTP --served-model-name GLM-5.2-W4A16-MTP "
          "--host 0.0.0.0 --port 8000 --tensor-parallel-size 8 --enable-expert-parallel --max-model-len 1048576 "
          "--kv-cache-dtype fp8 --gpu-memory-utilization 0.92 "
          "--speculative-config '{\"method\":\"mtp\",\"num_speculative_tokens\":3}' --tool-call-parser glm47 "
          "--reasoning-parser glm45 --enable-auto-tool-choice")
H200X4 = ("VLLM_ENGINE_READY_TIMEOUT_S=3600 vllm serve /models/GLM-5.2-W4A16-MTP --served-model-name GLM-5.2-W4A16-MTP "
          "--host 0.0.0.0 --port 8000 --tensor-parallel-size 4 --enable-expert-parallel --max-model-len 131072 "
          "--kv-cache-dtype fp8 --gpu-memory-utilization 0.95 "
          "--speculative-config '{\"method\":\"mtp\",\"num_speculative_tokens\":3}' --tool-call-parser glm47 "
          "--reasoning-parser glm45 --enable-auto-tool-choice")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtpquant", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})


@pytest.mark.parametrize(("profile", "expected"), [("h200x8", H200X8), ("h200x4", H200X4)])
def test_gpu_dry_run_prints_the_vllm_command(profile, expected):
    r = cli("serve", "--profile", profile, "--run", "/runs/glm-5.2", "--artifact", ART, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected


def test_gpu_dry_run_without_mtp_drops_only_the_speculative_config():
    r = cli("serve", "--profile", "h200x8", "--run", "/r", "--artifact", ART, "--dry-run", "--no-mtp")
    assert r.returncode == 0, r.stderr
    assert "--speculative-config" not in r.stdout
    assert r.stdout.strip() == H200X8.replace(
        " --speculative-config '{\"method\":\"mtp\",\"num_speculative_tokens\":3}'", "")


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
    import json

    from mtpquant.errors import MtpquantError

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
