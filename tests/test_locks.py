"""Every lockfile in pinned/ is what its input generates today, byte for byte (so it is neither stale nor
hand-edited, and `nox -s lock` is reproducible); the generators' parsing and validation."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mtpquant import locks

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "pinned"


def torch_source() -> list[str]:
    folder = os.environ.get("MTPQUANT_TORCH_FIND_LINKS", "/opt/wheels")
    return ["--find-links", folder] if Path(folder).is_dir() else ["--extra-index-url",
                                                                    "https://download.pytorch.org/whl/cpu"]


def uv() -> str:
    exe = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    assert Path(exe).exists(), "uv not found: it is in pinned/dev.txt and pinned/tools.txt"
    return exe


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    """A copy of pinned/'s inputs, every Python lock regenerated into it with the lock session's commands."""
    root = tmp_path_factory.mktemp("relock")
    (root / "pinned").mkdir()
    for p in PINNED.glob("*.in"):
        shutil.copy(p, root / "pinned" / p.name)
    for spec in locks.PY_LOCKS:
        cmd = locks.uv_compile(spec, torch_source())
        proc = subprocess.run([uv(), *cmd[1:]], cwd=root, env={**os.environ, **locks.UV_ENV},
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return root / "pinned"


def test_every_in_file_has_a_generator():
    generated = {s.name for s in locks.PY_LOCKS} | {"kernels", "images"}
    assert {p.stem for p in PINNED.glob("*.in")} == generated


@pytest.mark.network
@pytest.mark.parametrize("name", [s.name for s in locks.PY_LOCKS])
def test_python_lock_is_fresh(regenerated, name):
    fresh = (regenerated / f"{name}.txt").read_bytes()
    assert fresh == (PINNED / f"{name}.txt").read_bytes(), (
        f"pinned/{name}.txt is stale against pinned/{name}.in (or was edited): run `nox -s lock`")


@pytest.mark.network
def test_kernels_lock_is_fresh(tmp_path):
    shutil.copy(PINNED / "kernels.in", tmp_path / "kernels.in")
    # Tags resolve through GitHub where it answers; elsewhere the committed resolution is what we compare.
    locks.write_kernels_lock(tmp_path, previous=PINNED / "kernels.lock")
    assert (tmp_path / "kernels.lock").read_bytes() == (PINNED / "kernels.lock").read_bytes(), (
        "pinned/kernels.lock is stale against pinned/kernels.in: run `nox -s lock`")


def test_images_lock_is_fresh(tmp_path):
    shutil.copy(PINNED / "images.in", tmp_path / "images.in")
    shutil.copy(PINNED / "images.lock", tmp_path / "images.lock")  # carries the published images
    assert locks.write_images_lock(tmp_path, resolve=lambda tag: None) == []
    assert (tmp_path / "images.lock").read_bytes() == (PINNED / "images.lock").read_bytes()


def test_images_lock_pins_every_base_by_digest():
    lock = tomllib.loads((PINNED / "images.lock").read_text())
    assert set(lock["base"]) == {"cpu", "cuda", "cuda-devel"}
    for base in lock["base"].values():
        assert locks.DIGEST.match(base["digest"]) and base["ref"] == f"{base['tag']}@{base['digest']}"


def test_images_lock_rejects_a_base_without_digest(tmp_path):
    (tmp_path / "images.in").write_text('[base.cpu]\ntag = "debian:bookworm"\ndigest = "latest"\nwhy = "x"\n')
    with pytest.raises(ValueError, match="base.cpu"):
        locks.write_images_lock(tmp_path, resolve=lambda tag: None)


def test_moved_tag_is_reported_not_applied(tmp_path):
    shutil.copy(PINNED / "images.in", tmp_path / "images.in")
    moved = "sha256:" + "b" * 64
    notes = locks.write_images_lock(tmp_path, resolve=lambda tag: moved if "python" in tag else None)
    assert len(notes) == 1 and "base.cpu" in notes[0] and moved in notes[0]
    assert moved not in (tmp_path / "images.lock").read_text()


def test_record_published_keeps_the_bases(tmp_path):
    shutil.copy(PINNED / "images.in", tmp_path / "images.in")
    locks.write_images_lock(tmp_path, resolve=lambda tag: None)
    before = tomllib.loads((tmp_path / "images.lock").read_text())["base"]
    entry = {"ref": "127.0.0.1:5000/mtpquant-calibrate@sha256:" + "c" * 64, "content_tag": "0" * 16}
    locks.record_published(tmp_path, "calibrate-cpu", entry)
    after = tomllib.loads((tmp_path / "images.lock").read_text())
    assert after["base"] == before and after["published"]["calibrate-cpu"] == entry


CMAKE = """
if (DEFINED ENV{FLASH_MLA_SRC_DIR})
  set(FLASH_MLA_SRC_DIR $ENV{FLASH_MLA_SRC_DIR})
endif()
  set(_REPO "https://github.com/vllm-project/FlashMLA")
  set(_TAG "0eee43b12f034b657133cf2afca6a72ebb6efccf")
  FetchContent_Declare(flashmla GIT_REPOSITORY "${_REPO}" GIT_TAG "${_TAG}")
"""


def test_parse_fetch_expands_variables():
    src = locks.parse_fetch("flashmla", CMAKE)
    assert src == {"name": "flashmla", "repo": "https://github.com/vllm-project/FlashMLA",
                   "ref": "0eee43b12f034b657133cf2afca6a72ebb6efccf", "src_dir_env": "FLASH_MLA_SRC_DIR"}


def test_kernels_lock_resolves_tags_or_says_unresolved():
    spec = tomllib.loads((PINNED / "kernels.in").read_text())
    sources = [{"name": "cutlass", "repo": "https://github.com/nvidia/cutlass.git", "ref": "v4.7.1",
                "src_dir_env": "VLLM_CUTLASS_SRC_DIR", "declared_in": "CMakeLists.txt"}]
    sha = "1" * 40
    text = locks.kernels_lock_text(spec, "u", "0" * 64, sources, lambda repo, ref: sha)
    assert tomllib.loads(text)["source"][0]["sha"] == sha
    text = locks.kernels_lock_text(spec, "u", "0" * 64, sources, lambda repo, ref: None)
    assert tomllib.loads(text)["source"][0]["sha"] == locks.UNRESOLVED


def test_kernels_lock_pins_the_sparse_attention_kernels():
    lock = tomllib.loads((PINNED / "kernels.lock").read_text())
    sparse = {s["name"]: s for s in lock["source"] if s["sparse_attention"]}
    assert set(sparse) == {"deepgemm", "flashmla"}
    assert all(locks.SHA40.match(s["sha"]) for s in sparse.values())
    assert lock["toolchain"]["torch_cuda_arch_list"] == "9.0a"
    major, minor = map(int, lock["toolchain"]["cuda"].split(".")[:2])
    assert (major, minor) >= (12, 8)
