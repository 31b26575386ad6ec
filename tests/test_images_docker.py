"""Real images on a real engine (marker `docker`: CI runs these after .ci/docker-setup, which starts dockerd and
a loopback registry and makes the CPU base from Debian packages).

The CPU calibration image is built air-gapped from the wheelhouse, pushed to the registry, removed, pulled back
by digest and runs the tiny chain (prepare -> quantize -> inject-mtp -> verify) as its non-root user: the
artifact equals the venv's byte for byte. A second build from scratch gives the same image id and the same
registry digest. The CPU serving image is built, pushed, removed, pulled back by digest, and serves a tiny
GLM-4.5-layout model with MTP speculative decoding exactly as a venv from the same lock does (tokens,
logprobs, MTP counters)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mtpquant import images, locks
from mtpquant.checkpoint import file_sha256
from mtpquant.errors import MtpquantError

pytestmark = pytest.mark.docker
STATE = Path(os.environ.get("MTPQUANT_DOCKER_STATE", "/var/tmp/mtpquant-docker"))
REGISTRY = os.environ.get("MTPQUANT_REGISTRY", "127.0.0.1:5000")
RESULTS = Path(os.environ.get("MTPQUANT_DOCKER_RESULTS", STATE / "results.json"))


def base() -> str:
    """The CPU base .ci/docker-setup made from Debian packages and pushed (by digest), or MTPQUANT_BASE_CPU."""
    ref = os.environ.get("MTPQUANT_BASE_CPU", "")
    if not ref and (STATE / "base-cpu.ref").is_file():
        ref = (STATE / "base-cpu.ref").read_text().strip()
    assert "@sha256:" in ref, f"no CPU base: run .ci/docker-setup (writes {STATE / 'base-cpu.ref'})"
    return ref


def record(key: str, value) -> None:
    """Numbers for the report (build seconds, sizes, digests) in one JSON file next to the engine's state."""
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True))


def log(line: str) -> None:
    print(line, flush=True)


def forget(ref: str) -> None:
    """Remove an image and every tag of it, so the next use must pull it."""
    c = images.client()
    img = c.images.get(ref)
    for tag in img.tags:
        c.images.remove(tag, noprune=True)
    if images.exists(img.id):
        c.images.remove(img.id, force=True, noprune=True)


def built_image(image: str) -> tuple[images.BuildSpec, str]:
    s = images.spec(image, "cpu", {"cpu": base()})
    t0 = time.monotonic()
    image_id = images.build(s, log=log)
    record(f"{image}-cpu.build_seconds", round(time.monotonic() - t0, 1))
    record(f"{image}-cpu.size_bytes", images.client().images.get(image_id).attrs["Size"])
    return s, image_id


def publish_remove_pull(s: images.BuildSpec, image_id: str, pinned: Path) -> str:
    """Push to the loopback registry (recorded in a copy of images.lock), remove, pull back by digest."""
    for name in ("images.in", "images.lock"):
        (pinned / name).write_bytes((images.PINNED / name).read_bytes())
    entry = images.publish(s, REGISTRY, log=log, pinned=pinned)
    digest_ref = entry["ref"]
    forget(s.local_ref)
    assert not images.exists(s.local_ref) and not images.exists(image_id)
    lock = locks.read_toml(pinned / "images.lock")
    assert images.pull(s, log=log, build_fallback=False, images_lock=lock) == s.local_ref
    assert images.client().images.get(s.local_ref).id == image_id
    assert digest_ref in images.client().images.get(s.local_ref).attrs["RepoDigests"]
    return digest_ref


@pytest.fixture(scope="module", autouse=True)
def leave_no_images():
    """Images are GBs: remove this project's images (all tags, registry ones too) and the build cache after."""
    yield
    c = images.client()
    for img in c.images.list():
        if any(f"{images.NAMESPACE}-" in tag for tag in img.tags):
            c.images.remove(img.id, force=True)
    c.images.prune(filters={"dangling": True})


@pytest.fixture(scope="module")
def calibrate():
    s, image_id = built_image("calibrate")
    return s, image_id


def test_calibrate_image_is_labelled_non_root_and_lean(calibrate):
    s, image_id = calibrate
    attrs = images.client().images.get(image_id).attrs
    labels = attrs["Config"]["Labels"]
    assert attrs["Config"]["User"] == "10001:10001"
    assert labels["io.mtpquant.lock.sha256"] == locks.file_sha256(images.PINNED / "calibrate-cpu.txt")
    assert labels["org.opencontainers.image.revision"] == images.revision()
    assert labels["org.opencontainers.image.base.name"] == base()
    # Runs as 10001; no compiler; nothing of the build stage (wheelhouse, lock copy, extra CAs) left in /tmp.
    probe = ["sh", "-c", "id -u; command -v gcc cc g++ make; ls -A /tmp; echo end"]
    out: list[str] = []
    assert images.run(s.local_ref, probe, [], log=out.append) == 0
    assert out == ["10001", "end"], out


def test_calibrate_image_push_remove_pull_by_digest_runs_the_chain(calibrate, built, tmp_path):
    s, image_id = calibrate
    digest_ref = publish_remove_pull(s, image_id, tmp_path)
    record("calibrate-cpu.digest", digest_ref)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)  # the image's own non-root user writes here
    t0 = time.monotonic()
    for argv in (["prepare", "--model", "tiny-glm5"], ["quantize"], ["inject-mtp"], ["verify"]):
        code = images.run(s.local_ref, ["python", "-m", "mtpquant", *argv, "--run", str(run)], [str(run)], log=log)
        assert code == 0, argv
    record("calibrate-cpu.chain_seconds", round(time.monotonic() - t0, 1))
    venv = built["glm_moe_dsa"]["artifact"]
    ours = {p.name: file_sha256(p) for p in sorted((run / "artifact").iterdir())}
    theirs = {p.name: file_sha256(p) for p in sorted(venv.iterdir())}
    assert ours == theirs  # the same artifact, byte for byte, in the image and in the venv
    report = json.loads((run / "verify.json").read_text())
    assert report["ok"] and report["checks"] and all(c["ok"] for c in report["checks"])


def test_pull_refuses_a_published_image_built_from_other_inputs(calibrate):
    s, _ = calibrate
    other = images.BuildSpec(**{**s.__dict__, "tag": "0" * 16})
    lock = {"published": {s.key: {"ref": f"{REGISTRY}/{s.repo}@sha256:" + "e" * 64, "content_tag": "f" * 16}}}
    with pytest.raises(MtpquantError, match="built from other inputs"):
        images.pull(other, log=log, build_fallback=False, images_lock=lock)


def test_second_build_from_scratch_is_identical(calibrate):
    s, image_id = calibrate
    first = images.push(s, f"{REGISTRY}/first", log=log)
    t0 = time.monotonic()
    again = images.build(s, log=log, no_cache=True)
    record("calibrate-cpu.rebuild_seconds", round(time.monotonic() - t0, 1))
    second = images.push(s, f"{REGISTRY}/second", log=log)
    record("calibrate-cpu.rebuild_identical", {"image_id": [image_id, again],
                                              "digest": [first.split("@")[1], second.split("@")[1]]})
    assert again == image_id
    assert first.split("@")[1] == second.split("@")[1]


@pytest.fixture(scope="module")
def serve():
    assert (images.PINNED / "serve-cpu.txt").is_file(), "pinned/serve-cpu.txt (issue 3's serving lock) is missing"
    return built_image("serve")


SERVE_ARGS = ["--served-model-name", "tiny", "--max-model-len", "256", "--dtype", "bfloat16",
              "--speculative-config", '{"method":"mtp","num_speculative_tokens":1}', "--enforce-eager"]
SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
PROMPTS = ["12+34=", "Hello", "The quick brown"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        out["spec_decode"] = sorted(line for line in r.read().decode().splitlines()
                                    if line.startswith(("vllm:spec_decode_num_draft_tokens_total",
                                                        "vllm:spec_decode_num_accepted_tokens_total")))
    return out


def serve_in_image(ref: str, model: Path) -> dict:
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

        def alive() -> bool:
            box.reload()
            return box.status in ("created", "running")

        return query(int(port), alive)
    finally:
        box.remove(force=True)


def serve_in_venv(python: Path, model: Path) -> dict:
    port = free_port()
    proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--host", "127.0.0.1", "--port", str(port), *SERVE_ARGS], env={**os.environ, **SERVE_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return query(port, lambda: proc.poll() is None)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def tiny_glm4(tmp_path_factory) -> Path:
    from mtpquant.fixture import write_fixture
    from mtpquant.recipes import FixtureSpec

    model = write_fixture("glm4_moe", FixtureSpec(), tmp_path_factory.mktemp("serve") / "model")
    for p in [model.parent, model, *model.iterdir()]:  # the image's non-root user reads it
        p.chmod(0o755 if p.is_dir() else 0o644)
    return model


def test_serve_image_push_remove_pull_by_digest_serves_like_the_venv(serve, tiny_glm4, tmp_path):
    s, image_id = serve
    record("serve-cpu.digest", publish_remove_pull(s, image_id, tmp_path))
    in_image = serve_in_image(s.local_ref, tiny_glm4)
    record("serve-cpu.ready_seconds", in_image.pop("ready_seconds"))
    # The same stack in a venv, from the same hashed lock and the wheels the image was built from.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "--require-hashes", "--no-index",
                    "--find-links", str(s.wheelhouse), "-r", str(images.PINNED / "serve-cpu.txt")], check=True)
    in_venv = serve_in_venv(venv / "bin" / "python", tiny_glm4)
    in_venv.pop("ready_seconds")
    assert all(c["tokens"] and len(c["tokens"]) == 16 for c in in_image["completions"])
    assert any("draft_tokens_total" in line and not line.endswith(" 0.0") for line in in_image["spec_decode"])
    assert in_image == in_venv  # tokens, logprobs (4 decimals) and MTP draft/accept counters
