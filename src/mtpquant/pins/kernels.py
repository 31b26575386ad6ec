"""Build vLLM for the CUDA serving image from pinned/kernels.lock: its hashed sdist, every git source its CMake
would fetch (DeepGEMM and FlashMLA's sparse kernels among them) checked out at a 40-hex commit, compiled for
the lock's arch list. `plan` prints what a build would do (the dry run); `build` does it (inside the image).

Stdlib only (Python >= 3.11): the serving Dockerfile copies this file into its build stage and runs it there.
Usage: python3 kernels.py plan LOCK | python3 kernels.py build LOCK --workdir DIR --wheels DIR
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import urllib.request
import zipfile
from pathlib import Path

# Not imported from mtpquant.pins.locks: this file runs alone inside the image's build stage (stdlib only).
SHA40 = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What must be in the built wheel for GLM-5's sparse attention to run: FlashMLA's sparse kernels and DeepGEMM.
REQUIRED_IN_WHEEL = (re.compile(r"^vllm/_flashmla_C\..*so$"), re.compile(r"^vllm/third_party/deep_gemm/"))


class LockError(ValueError):
    pass


def unresolved(lock: dict) -> list[str]:
    return [f"{s['name']} ({s['repo']} {s['ref']})" for s in lock.get("source", []) if not SHA40.match(s["sha"])]


def load(lock_path: Path, strict: bool = True) -> dict:
    """The lock; strict (a build): refuse anything not pinned by content."""
    lock = tomllib.loads(Path(lock_path).read_text())
    if not strict:
        return lock
    problems = []
    if not SHA256.match(lock.get("vllm", {}).get("sdist_sha256", "")):
        problems.append("vllm.sdist_sha256 is not a sha256")
    for src in lock.get("source", []):
        if not SHA40.match(src.get("sha", "")):
            problems.append(f"source {src.get('name')}: sha {src.get('sha')!r} (ref {src.get('ref')!r}) is not a "
                            "40-hex commit; run `nox -s lock` where GitHub is reachable")
    if problems:
        raise LockError(f"{lock_path}: " + "; ".join(problems))
    return lock


def build_env(lock: dict, workdir: Path) -> dict[str, str]:
    """The environment vLLM's setup.py/CMake build runs with: every source local, one arch list."""
    tc = lock["toolchain"]
    env = {
        "VLLM_TARGET_DEVICE": "cuda",
        "TORCH_CUDA_ARCH_LIST": tc["torch_cuda_arch_list"],
        # The Rust frontend is optional; building it would fetch crates outside this lock.
        "VLLM_REQUIRE_RUST_FRONTEND": "0",
        "SETUPTOOLS_SCM_PRETEND_VERSION": lock["vllm"]["version"],
    }
    for src in lock["source"]:
        path = workdir / "src" / src["name"]
        env[src["src_dir_env"]] = str(path / src.get("source_subdir", "")).rstrip("/")
    return env


def fetch_commands(src: dict, dest: Path) -> list[list[str]]:
    """git commands that materialize one source at exactly its commit (submodules at the commits it records)."""
    sha = src["sha"]
    g = ["git", "-C", str(dest)]
    return [["git", "init", "-q", str(dest)], [*g, "fetch", "-q", "--depth", "1", src["repo"], sha],
            [*g, "-c", "advice.detachedHead=false", "checkout", "-q", sha],
            [*g, "submodule", "update", "-q", "--init", "--recursive", "--depth", "1"]]


def plan(lock: dict, workdir: Path) -> list[str]:
    v, tc = lock["vllm"], lock["toolchain"]
    lines = [f"vllm {v['version']} sdist {v['sdist_url']} sha256:{v['sdist_sha256']}",
             f"toolchain: CUDA {tc['cuda']}, gcc {tc['gcc']}, Python {tc['python']}, "
             f"TORCH_CUDA_ARCH_LIST={tc['torch_cuda_arch_list']}"]
    for src in sorted(lock["source"], key=lambda s: (not s.get("sparse_attention"), s["name"])):
        tag = " [sparse attention]" if src.get("sparse_attention") else ""
        lines.append(f"source {src['name']}{tag}: {src['repo']} @ {src['sha']} (ref {src['ref']}) "
                     f"-> ${src['src_dir_env']}")
    lines += [f"env {k}={val}" for k, val in sorted(build_env(lock, workdir).items())]
    lines.append(f"pip wheel --no-deps --no-build-isolation --no-index {workdir / 'vllm'}")
    return lines


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def fetch_sdist(lock: dict, workdir: Path) -> Path:
    v = lock["vllm"]
    with urllib.request.urlopen(v["sdist_url"], timeout=600) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != v["sdist_sha256"]:
        raise LockError(f"{v['sdist_url']}: sha256 mismatch")
    archive = workdir / "vllm.tar.gz"
    archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    src = workdir / f"vllm-{v['version']}"
    src.rename(workdir / "vllm")
    return workdir / "vllm"


def check_wheel(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    missing = [p.pattern for p in REQUIRED_IN_WHEEL if not any(p.search(n) for n in names)]
    if missing:
        raise LockError(f"{wheel.name}: the sparse-attention kernels are missing ({', '.join(missing)})")


def build(lock: dict, workdir: Path, wheels: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    src_root = fetch_sdist(lock, workdir)
    for src in lock["source"]:
        dest = workdir / "src" / src["name"]
        for cmd in fetch_commands(src, dest):
            _run(cmd)
        head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        if head != src["sha"]:
            raise LockError(f"source {src['name']}: HEAD {head} != {src['sha']}")
    env = {**os.environ, **build_env(lock, workdir)}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(wheels), str(src_root)], env=env)
    wheel = next(wheels.glob("vllm-*.whl"))
    check_wheel(wheel)
    return wheel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["plan", "build"])
    p.add_argument("lock", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vllm-build"))
    p.add_argument("--wheels", type=Path, default=Path("/wheels"))
    args = p.parse_args(argv)
    try:
        lock = load(args.lock, strict=args.action == "build")
        if args.action == "plan":
            print("\n".join(plan(lock, args.workdir)))
            for name in unresolved(lock):
                print(f"UNRESOLVED {name}: a build refuses to start until `nox -s lock` resolves it")
        else:
            print(f"built {build(lock, args.workdir, args.wheels)}")
    except LockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
