"""Where a stage session runs: in a nox venv from the stage's lockfile (`--runtime local`) or in the stage's
image (`--runtime docker`: all GPUs, a large /dev/shm, the run/model directories and the hub cache mounted at
their own paths, the caller's UID). `--runtime auto` (the default) picks docker when an engine answers and
GPUs are present, else local. Stdlib only: the noxfile imports it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

RUNTIMES = ("auto", "docker", "local")
# Stage options whose value is a path: mounted into the container at the same absolute path.
PATH_OPTIONS = {"--run", "--model", "--base", "--quantized", "--out", "--artifact", "--calibration",
                "--recipe", "--reference", "--output"}
# Options that name a directory the stage creates (mount their parent if they do not exist yet).
OUTPUT_OPTIONS = {"--run", "--out", "--output"}
# NCCL and PyTorch's dataloaders use /dev/shm; Docker's default is 64 MiB.
DEFAULT_SHM = os.environ.get("MTPQUANT_SHM_SIZE", "64g")


class RuntimeChoiceError(ValueError):
    pass


def split_runtime(posargs: list[str]) -> tuple[str, list[str]]:
    """('auto'|'docker'|'local', the other arguments) from a session's posargs."""
    runtime, rest, args = os.environ.get("MTPQUANT_RUNTIME", "auto"), [], list(posargs)
    while args:
        a = args.pop(0)
        if a == "--runtime":
            runtime = args.pop(0) if args else ""
        elif a.startswith("--runtime="):
            runtime = a.split("=", 1)[1]
        else:
            rest.append(a)
    if runtime not in RUNTIMES:
        raise RuntimeChoiceError(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    return runtime, rest


def has_gpus() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def choose(runtime: str) -> str:
    if runtime == "auto":
        return "docker" if docker_answers() and has_gpus() else "local"
    return runtime


def hub_cache() -> Path:
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).resolve()


def mounts_for(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv with path values made absolute, host directories to mount)."""
    out, mounts = [], []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        name, eq, inline = a.partition("=")
        if name in PATH_OPTIONS and (eq or i + 1 < len(argv)):
            value = inline if eq else argv[i + 1]
            if not eq:
                next(it)
            p = Path(value)
            # A recipe name (no slash, not on disk) stays a name: the image carries the recipes.
            if p.exists() or "/" in value or name in OUTPUT_OPTIONS:
                p = p.resolve()
                if name in OUTPUT_OPTIONS:
                    p.mkdir(parents=True, exist_ok=True)
                mounts.append(str(p if p.is_dir() else p.parent))
                value = str(p)
            out += [f"{name}={value}"] if eq else [name, value]
        else:
            out.append(a)
    return out, sorted(set(mounts))


def docker_command(image: str, stage_argv: list[str], gpus: bool | None = None) -> list[str]:
    """Arguments for `python -m mtpquant.images run` that run `python -m mtpquant STAGE_ARGV` in the image."""
    gpus = has_gpus() if gpus is None else gpus
    argv, mounts = mounts_for(stage_argv)
    cache = hub_cache()
    cache.mkdir(parents=True, exist_ok=True)
    cmd = ["run", "--image", image, "--flavour", "cuda" if gpus else "cpu",
           "--user", f"{os.getuid()}:{os.getgid()}", "--env", f"HF_HOME={cache}", "--mount", str(cache)]
    for m in mounts:
        cmd += ["--mount", m]
    if gpus:
        cmd += ["--gpus", "--shm-size", DEFAULT_SHM]
    return [*cmd, "--", "python", "-m", "mtpquant", *argv]
