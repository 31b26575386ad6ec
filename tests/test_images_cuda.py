"""The CUDA images' inputs without an engine: the toolchain is a lock line generated from kernels.in's CUDA
version and checked offline, every flavour's Dockerfile labels every lock it consumes, and the dry runs."""

import shutil
from pathlib import Path

import pytest

from mtpquant import images
from mtpquant.core.checkpoint import file_sha256
from mtpquant.images.labels import dockerfile_labels, label_problems, lock_files
from mtpquant.images.pins import TOOLCHAIN_HOME
from mtpquant.pins import locks

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "pinned"
SERVE_CUDA = next(lock for lock in locks.PY_LOCKS if lock.name == "serve-cuda")


def test_the_toolchain_is_kernels_in_cuda_as_a_lock_line():
    assert locks.toolchain_requirement(PINNED) == "cuda-toolkit[nvcc,cccl]==13.0.3"
    entries = locks.parse_entries((PINNED / "serve-cuda.txt").read_text())
    assert entries["nvidia-cuda-nvcc"][0] == "13.0.88" and entries["nvidia-cuda-nvcc"][1]  # pinned, hashed
    assert entries["vllm"][0] == "0.32.0" and entries["flashinfer-python"][1]
    assert locks.check_lock(SERVE_CUDA, PINNED) == []
    newer = dict(entries, **{"nvidia-cuda-nvcc": ("13.5.37", ["0" * 64])})  # what vLLM's deps alone resolve to
    assert locks.toolchain_problems(newer, PINNED) == [
        "nvidia-cuda-nvcc==13.5.37 is not CUDA 13.0 (pinned/kernels.in): run `nox -s lock`"]


def test_a_new_cuda_version_in_kernels_in_makes_the_lock_stale(tmp_path):
    pinned = tmp_path / "pinned"
    shutil.copytree(PINNED, pinned)
    kin = pinned / "kernels.in"
    kin.write_text(kin.read_text().replace('cuda = "13.0.3"', 'cuda = "13.1.0"'))
    problems = locks.check_lock(SERVE_CUDA, pinned)
    assert any("toolchain is 'cuda-toolkit[nvcc,cccl]==13.0.3 (pinned/kernels.in)'" in p and
               "13.1.0" in p for p in problems), problems
    assert any(p.endswith("cuda-toolkit==13.0.3.0, pinned/kernels.in names CUDA 13.1.0: run `nox -s lock`")
               for p in problems), problems


def test_lock_write_only_refuses_an_unknown_lock():
    with pytest.raises(ValueError, match="--only nope: no such lock"):
        locks.write_all(PINNED, only={"nope"})


FLAVOURS = [(i, f) for i in images.FLAVOURS for f in images.FLAVOURS[i]]


@pytest.mark.parametrize("image,flavour", FLAVOURS)
def test_every_flavour_labels_every_lock_it_consumes(image, flavour):
    s = images.spec(image, flavour)
    labels = dockerfile_labels(ROOT / s.dockerfile, s.buildargs)
    assert label_problems(labels, image, flavour) == []
    assert labels["io.mtpquant.flavour"] == flavour and labels["org.opencontainers.image.base.name"] == \
        s.buildargs["BASE_IMAGE"]


def test_label_check_names_a_missing_or_stale_lock_hash():
    s = images.spec("serve", "cuda-source")
    labels = dockerfile_labels(ROOT / s.dockerfile, s.buildargs)
    assert set(lock_files("serve", "cuda-source").values()) == {"serve-cuda.txt", "kernels.lock",
                                                                "serve-cuda-build.txt"}
    stale = dict(labels, **{"io.mtpquant.kernels.sha256": "0" * 64})
    del stale["io.mtpquant.build-lock.sha256"]
    assert label_problems(stale, "serve", "cuda-source") == [
        f"serve/cuda-source: label io.mtpquant.kernels.sha256 is {'0' * 64}, pinned/kernels.lock is "
        f"{file_sha256(PINNED / 'kernels.lock')}",
        "serve/cuda-source: label io.mtpquant.build-lock.sha256 is missing, pinned/serve-cuda-build.txt is "
        f"{file_sha256(PINNED / 'serve-cuda-build.txt')}"]


def test_serve_cuda_puts_the_locked_nvcc_on_path(capsys):
    s = images.spec("serve", "cuda")
    assert s.buildargs["TOOLCHAIN_HOME"] == TOOLCHAIN_HOME and "KERNELS" not in s.buildargs
    assert images.main(["plan", "--image", "serve", "--flavour", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "vllm==0.32.0" in out and "flashinfer-python==0.7.0.post1" in out and "nvidia-cuda-nvcc==13.0.88" in out
    assert "toolchain cuda-toolkit[nvcc,cccl]==13.0.3 from pinned/serve-cuda.txt" in out
    assert "UNRESOLVED" not in out  # nothing is compiled: the kernel sources' pins do not gate this flavour


def test_images_cuda_session_runs_the_release():
    from mtpquant.pins import envs

    assert envs.images_commands(["--image", "serve"], "images-cuda") == [["release", "--image", "serve"]]
    assert envs.images_commands(["--plan"]) == [["plan"]]
