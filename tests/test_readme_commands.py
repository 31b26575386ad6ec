"""Every command in the README's ```bash blocks is either run here as written (the cheap ones: dry runs, `--help`,
`plan`, the images' `--plan`) or named below with the test that covers it. A README command in neither table
fails the test, so a new one is never silently skipped; a table entry the README no longer has fails too.

The cheap commands run in a shell at the repository root with this interpreter's bin directory first on PATH
(what `source .venv/bin/activate` gives) and nox as `nox -s tests` passes it ($MTPQUANT_NOX: the python running
nox), else the `nox` on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run as written; each must exit 0 and print what is given.
CHEAP = {
    "make dev": "source .venv/bin/activate",
    "source .venv/bin/activate && mtpquant --help": "prepare",
    "python -m mtpquant.pins.locks check": "",
    "mtpquant plan --model glm-5.2 --calibration glm5-code-instruct --gpu h200 --gpus 8": "",
    "nox -s serve-h200x8 -- --run runs/glm-5.2 --dry-run": "--tensor-parallel-size 8",
    "nox -s serve-h200x4 -- --run runs/glm-5.2 --dry-run": "--tensor-parallel-size 4",
    "nox -s images -- --image serve --flavour cuda --plan": "nvidia-cuda-nvcc==13.0.88",
    "nox -s images -- --image serve --flavour cuda-source --plan": "TORCH_CUDA_ARCH_LIST=9.0a",
}
# Run as written on a machine without a GPU: must stop with this one line before any environment is built.
REFUSED_WITHOUT_GPU = {"make artifact": "no NVIDIA GPU visible"}
# Not run here: too long, needs hardware, the network, or a value of the user's; the test file that covers it.
COVERED = {
    "python3 -m pip install --require-hashes -r pinned/tools.txt": ".ci/run (its first step)",
    "make demo": "tests/test_serve_chain.py (the same stages, models and servers)",
    "make test": "tests/ (this suite)",
    "nox -s lock -- --check": "tests/test_locks.py (the offline gate; drift needs today's index)",
    "nox -s lock -- --check --strict": "tests/test_locks.py (the offline gate; drift needs today's index)",
    "nox -s serve-cpu -- --run runs/demo-tiny-arith": "tests/test_serve_chain.py (serves until Ctrl-C)",
    "nox -s eval -- --run DIR [--suite tiny|seed] [--base-url URL] [--no-mtp]": "tests/test_serve_chain.py",
    "nox -s bench -- --run DIR [--grid tiny|seed]": "tests/test_serve_chain.py",
    "nox -s report -- --run DIR": "tests/test_serve_chain.py",
    "nox -s train-tiny -- --steps 4000 --out runs/tiny-arith-stage1": "tests/test_tiny_model.py (30 min)",
    "nox -s train-tiny -- --init runs/tiny-arith-stage1 --steps 1200 --lr 3e-4 --seed 1 --out data/models/tiny-arith":
        "tests/test_tiny_model.py (12 min)",
    "make images": "tests/test_images_docker_calibrate.py (make test-docker)",
    "nox -s images -- --base cpu=MIRROR/python@sha256:...": "tests/test_images.py (a mirror of the user's)",
    "nox -s images -- --push REGISTRY": "tests/test_images_docker_calibrate.py (make test-docker)",
    "make pull": "tests/test_images_docker_serve.py (make test-docker)",
    "nox -s images-cuda": "tests/test_images_docker_cuda.py (pytest -m docker_cuda, after the session; ~1 h)",
    "nox -s quantize -- --run runs/x --runtime docker": "tests/test_images_docker_calibrate.py (make test-docker)",
    "nox -s lock-sources -- glm-5.2": "tests/test_hub.py (the lock's checks; writing one needs the hub)",
    "mtpquant publish --run runs/glm-5.2 --repo ORG/GLM-5.2-W4A16-MTP --dry-run": "tests/test_publish.py (a tiny run)",
    "mtpquant publish --run runs/glm-5.2 --repo ORG/GLM-5.2-W4A16-MTP": "tests/test_publish.py (upload needs the hub)",
}


def readme_commands() -> list[str]:
    """Each line of each ```bash block, without its comment, spaces collapsed."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            command = " ".join(re.split(r"\s#\s|^#", line)[0].split())
            if command:
                out.append(command)
    return out


def test_every_readme_command_is_run_or_covered():
    known = {*CHEAP, *REFUSED_WITHOUT_GPU, *COVERED}
    commands = readme_commands()
    unknown = [c for c in commands if c not in known]
    assert not unknown, f"README commands neither run here nor covered (add them to a table): {unknown}"
    stale = sorted(known - set(commands))
    assert not stale, f"table entries the README no longer shows: {stale}"
    for where in COVERED.values():
        path = where.split()[0]
        assert (ROOT / path).exists(), f"{path} (named as covering a README command) does not exist"


def shell_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    nox_python = env.get("MTPQUANT_NOX")
    if nox_python:
        env["NOX"] = f"{nox_python} -m nox"  # make's $(NOX)
        shim = ROOT / ".nox" / "readme-bin"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "nox").write_text(f'#!/bin/sh\nexec "{nox_python}" -m nox "$@"\n')
        (shim / "nox").chmod(0o755)
        env["PATH"] = os.pathsep.join([str(shim), env["PATH"]])
    return env


def run(command: str) -> subprocess.CompletedProcess[str]:
    env = shell_env()
    if command.split()[0] in ("nox", "make") and not shutil.which("nox", path=env["PATH"]):
        pytest.skip("no nox here (`nox -s tests` passes $MTPQUANT_NOX)")
    if "source .venv/bin/activate" in command and not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip(".venv does not exist (`make dev` makes it)")
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("command", sorted(CHEAP))
def test_cheap_readme_command_runs(command):
    result = run(command)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{output[-3000:]}"
    assert CHEAP[command] in output, f"`{command}` did not print {CHEAP[command]!r}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.parametrize("command", sorted(REFUSED_WITHOUT_GPU))
def test_gpu_command_refuses_before_building(command):
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is visible: the real run is not cheap")
    result = run(command)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert REFUSED_WITHOUT_GPU[command] in output, output[-3000:]
    assert "installing" not in output, f"an environment was built before the preflight:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
