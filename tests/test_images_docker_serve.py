"""The CPU serving image on a real engine (marker `docker`; after .ci/docker-setup).

Built, pushed to the loopback registry, removed and pulled back by digest, it serves the tiny trained model
(data/models/tiny-arith, with its MTP layer, speculative decoding at k=1) exactly as a venv from the same lock
does: the same greedy tokens and log-probabilities, the same MTP draft/accept counters on them, and the same
lm-eval results (accuracy and every answer) on a slice of the held-out task (its MTP counters within a bound: see
the test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from mtpquant import images
from mtpquant.serving.evaluate import spec_counters
from mtpquant.serving.serve import free_port
from tests.docker_support import built_image, leave_no_images, publish_remove_pull, record

pytestmark = pytest.mark.docker
__all__ = ["leave_no_images"]  # the module's cleanup fixture

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "models" / "tiny-arith"
SERVE_ARGS = ["--served-model-name", "tiny", "--max-model-len", "512", "--dtype", "bfloat16",
              "--speculative-config", '{"method":"mtp","num_speculative_tokens":1}', "--enforce-eager"]
SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
PROMPTS = ["Question: Tom has 12 apples and buys 34 more. How many apples does he have?\nAnswer:", "12+34=",
           "The quick brown"]


@pytest.fixture(scope="module")
def serve_python() -> str:
    py = os.environ.get("MTPQUANT_SERVE_PYTHON", "")
    assert Path(py).exists(), "MTPQUANT_SERVE_PYTHON must name the serving venv's python (`nox -s tests` sets it)"
    return py


@pytest.fixture(scope="module")
def serve():
    assert (images.PINNED / "serve-cpu.txt").is_file(), "pinned/serve-cpu.txt (the serving lock) is missing"
    return built_image("serve")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The committed tiny model, readable by the image's non-root user."""
    dst = tmp_path_factory.mktemp("serve") / "tiny-arith"
    shutil.copytree(MODEL, dst)
    for p in [dst.parent, dst, *dst.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def query(port: int, alive, timeout: float = 600) -> dict:
    """Wait for /health, then greedy completions with logprobs and the spec-decode counters."""
    t0 = time.monotonic()
    while True:
        assert alive(), "the server exited before it was ready"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                break
        except OSError:
            assert time.monotonic() - t0 < timeout, f"vLLM not ready within {timeout} s"
            time.sleep(3)
    out: dict = {"ready_seconds": round(time.monotonic() - t0, 1), "completions": []}
    for prompt in PROMPTS:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0,
                           "ignore_eos": True, "logprobs": 1}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            choice = json.load(r)["choices"][0]
        out["completions"].append({"text": choice["text"], "tokens": choice["logprobs"]["tokens"],
                                   "logprobs": [round(x, 4) for x in choice["logprobs"]["token_logprobs"]]})
    out["spec_decode"] = spec_counters(f"http://127.0.0.1:{port}")
    return out


def evaluate(python: str, port: int, model: Path, run: Path, label: str) -> dict:
    """`mtpquant eval` (lm-eval, from the serving venv) against the server on `port`."""
    r = subprocess.run([python, "-m", "mtpquant", "eval", "--run", str(run), "--suite", "tiny-quick",
                        "--base-url", f"http://127.0.0.1:{port}", "--name", "tiny", "--tokenizer", str(model),
                        "--label", label], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / "eval" / f"{label}.json").read_text())
    return {"tasks": [{k: t[k] for k in ("task", "value", "stderr", "n")} for t in res["tasks"]],
            "samples": res["samples"], "mtp_acceptance": res["mtp_acceptance"]}


def in_image(ref: str, model: Path, python: str, run: Path) -> dict:
    box = images.client().containers.run(
        ref, ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", "8000",
              *SERVE_ARGS], volumes={str(model): {"bind": str(model), "mode": "ro"}},
        ports={"8000/tcp": ("127.0.0.1", None)}, environment=SERVE_ENV, shm_size="1g", detach=True)
    try:
        port = None
        for _ in range(60):
            box.reload()
            if port := (box.ports.get("8000/tcp") or [{}])[0].get("HostPort"):
                break
            time.sleep(1)
        assert port, "the container published no port"

        def alive() -> bool:
            box.reload()
            return box.status in ("created", "running")

        out = query(int(port), alive)
        out["eval"] = evaluate(python, int(port), model, run, "image")
        return out
    finally:
        box.remove(force=True)


def in_venv(python: str, model: Path, run: Path) -> dict:
    port = free_port()
    proc = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--host", "127.0.0.1", "--port", str(port), *SERVE_ARGS], env={**os.environ, **SERVE_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out = query(port, lambda: proc.poll() is None)
        out["eval"] = evaluate(python, port, model, run, "venv")
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
        proc.wait(timeout=60)


def test_serve_image_pulled_by_digest_serves_and_evaluates_like_the_venv(serve, model, serve_python, tmp_path):
    s, image_id = serve
    record("serve-cpu.digest", publish_remove_pull(s, image_id, tmp_path))
    image = in_image(s.local_ref, model, serve_python, tmp_path / "image")
    record("serve-cpu.ready_seconds", image.pop("ready_seconds"))
    record("serve-cpu.eval", image["eval"]["tasks"])
    # The same stack in the tests' serving venv (.nox/serve-cpu-env: the same hashed lock, the same wheels).
    venv = in_venv(serve_python, model, tmp_path / "venv")
    venv.pop("ready_seconds")
    assert all(len(c["tokens"]) == 16 for c in image["completions"])
    assert image["spec_decode"]["vllm:spec_decode_num_draft_tokens_total"] > 0
    ev = image["eval"]
    assert ev["tasks"][0]["n"] == 40 and ev["tasks"][0]["value"] >= 0.6, ev["tasks"]  # it knows its task
    assert ev["mtp_acceptance"] and ev["mtp_acceptance"]["rate"] >= 0.5, ev["mtp_acceptance"]
    # The eval's MTP counters are the one timing-dependent number: lm-eval stops each answer with a stop string,
    # which vLLM matches in the API process and then aborts in the engine, so the engine may have run one more
    # draft step for that request first (CI saw 292 vs 293 draft tokens, same answers). Each of the n requests can
    # overrun by a step or two, so the counters must agree within 2n and the rates within 0.02; all else exactly.
    acc_image, acc_venv = image["eval"].pop("mtp_acceptance"), venv["eval"].pop("mtp_acceptance")
    n = ev["tasks"][0]["n"]
    assert abs(acc_image["draft_tokens"] - acc_venv["draft_tokens"]) <= 2 * n, (acc_image, acc_venv)
    assert abs(acc_image["rate"] - acc_venv["rate"]) <= 0.02, (acc_image, acc_venv)
    assert image == venv  # tokens, logprobs (4 decimals), the completions' MTP counters, accuracy, every answer
