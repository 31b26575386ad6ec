"""The offline lock gate (every lock is what its recorded inputs make, unedited, and satisfies its .in), the
drift report's table, and the generators' parsing and validation. Nothing here reads the package index: whether
today's index still gives the same bytes is `nox -s lock -- --check`, a report."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mtpquant.pins import locks

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "pinned"
CALIB = next(lock for lock in locks.PY_LOCKS if lock.name == "calibrate-cpu")
# Any connection attempt fails: the gate must not need one (run in a subprocess with this prepended).
NO_NETWORK = """
import socket
def _refuse(*a, **k):
    raise OSError("network disabled for this test")
socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = _refuse
"""


def test_every_in_file_has_a_generator():
    generated = {s.name for s in locks.PY_LOCKS} | {"kernels", "images"}
    assert {p.stem for p in PINNED.glob("*.in")} == generated


def test_committed_locks_pass_the_gate_with_the_network_disabled():
    """Sockets refused in-process and the indexes pointed at a closed loopback port: the gate still passes."""
    dead = "http://127.0.0.1:9/simple"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "UV_INDEX_URL": dead, "PIP_INDEX_URL": dead,
           "UV_OFFLINE": "1", "PIP_NO_INDEX": "1"}
    code = NO_NETWORK + "from mtpquant.pins.locks import main; raise SystemExit(main(['check']))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"({len(locks.PY_LOCKS) + 1} checked)" in proc.stdout


@pytest.fixture
def pinned(tmp_path) -> Path:
    copy = tmp_path / "pinned"
    shutil.copytree(PINNED, copy)
    return copy


def edit(path: Path, old: str, new: str, restamp: bool = False) -> None:
    """A hand edit; with restamp, one that also forges the body's sha256 (so only the parse checks can see it)."""
    text = path.read_text()
    assert old in text
    text = text.replace(old, new, 1)
    if restamp:
        fields, body = locks.split_stamp(text)
        fields.pop("body-sha256")
        text = locks.stamp(body, fields)
    path.write_text(text)


def one_hash(text: str, name: str) -> str:
    return re.search(rf"^{name}==\S+ \\\n    (--hash=sha256:[0-9a-f]+)", text, re.M).group(1)


def test_gate_passes_the_committed_locks(pinned):
    assert locks.check_all(pinned) == []


def test_gate_catches_a_changed_version(pinned):
    lock = pinned / "calibrate-cpu.txt"
    version = locks.pinned_version(lock.read_text(), "rich")
    edit(lock, f"rich=={version} ", "rich==0.0.1 ")
    problems = locks.check_lock(CALIB, pinned)
    assert len(problems) == 1 and "pinned/calibrate-cpu.txt: edited by hand" in problems[0]


def test_gate_catches_a_forged_pin_that_breaks_the_in(pinned):
    edit(pinned / "calibrate-cpu.txt", "transformers==5.17.0 ", "transformers==5.16.0 ", restamp=True)
    assert locks.check_lock(CALIB, pinned) == ["pinned/calibrate-cpu.txt: transformers==5.16.0 does not satisfy "
                                               "transformers==5.17.0 (pinned/calibrate-cpu.in)"]


def test_gate_catches_a_removed_hash(pinned):
    lock = pinned / "calibrate-cpu.txt"
    text = lock.read_text()
    entry = re.search(r"^rich==\S+ \\\n(?:    --hash=\S+(?: \\)?\n)+", text, re.M).group(0)
    first_hash_line = entry.splitlines(keepends=True)[1]
    edit(lock, first_hash_line, "")
    assert any("edited by hand" in p for p in locks.check_lock(CALIB, pinned))
    lock.write_text(text)  # now every hash of the entry gone, and the body's sha256 forged to agree
    edit(lock, entry, entry.split(" \\\n")[0] + "\n", restamp=True)
    assert locks.check_lock(CALIB, pinned) == [
        f"pinned/calibrate-cpu.txt: rich=={locks.pinned_version(text, 'rich')} has no --hash"]


def test_gate_catches_a_changed_in_and_its_dependents(pinned):
    (pinned / "calibrate-cpu.in").write_text((pinned / "calibrate-cpu.in").read_text() + "tqdm\n")
    assert any(p.startswith("pinned/calibrate-cpu.txt: in is ") for p in locks.check_lock(CALIB, pinned))
    (pinned / "calibrate-cpu.txt").write_text((pinned / "calibrate-cpu.txt").read_text() + "\n")
    dev = next(lock for lock in locks.PY_LOCKS if lock.name == "dev")
    assert any("constraint-0" in p for p in locks.check_lock(dev, pinned))  # dev.in is constrained by it


def test_gate_catches_changed_settings_and_a_missing_header(pinned, monkeypatch):
    monkeypatch.setattr(locks, "EXCLUDE_NEWER", "2030-01-01T00:00:00Z")
    assert any("exclude-newer" in p for p in locks.check_lock(CALIB, pinned))
    monkeypatch.undo()
    edit(pinned / "tools.txt", "uv==", "uv==0.0.0\nxx==")  # a lock made by another uv than tools.txt pins
    assert any(": uv is " in p for p in locks.check_lock(CALIB, pinned))
    lock = pinned / "calibrate-cpu.txt"
    lock.write_text(locks.split_stamp(lock.read_text())[1])
    assert locks.check_lock(CALIB, pinned) == [
        "pinned/calibrate-cpu.txt: no inputs header (made by an older lock session, or edited): run `nox -s lock`"]


def test_gate_checks_the_kernels_lock(pinned):
    assert locks.check_stamped(pinned / "kernels.lock", [pinned / "kernels.in"]) == []
    edit(pinned / "kernels.in", 'gcc = "13"', 'gcc = "14"')
    assert locks.check_stamped(pinned / "kernels.lock", [pinned / "kernels.in"]) == [
        "pinned/kernels.lock: pinned/kernels.in changed since the lock was made: run `nox -s lock`"]


def test_drift_rows_name_what_moved():
    text = (PINNED / "serve-cuda.txt").read_text()
    version = locks.pinned_version(text, "numpy")
    moved = text.replace(f"numpy=={version} ", "numpy==99.0 ", 1)
    moved = moved.replace(one_hash(text, "rich"), "--hash=sha256:" + "0" * 64)
    rows = locks.drift_rows(text, moved)
    assert rows == [("numpy", version, "99.0"), ("rich", locks.pinned_version(text, "rich"),
                                                 f"{locks.pinned_version(text, 'rich')} (other files)")]
    printed = locks.table([("serve-cuda", *r) for r in rows], ("lock", "package", "pinned", "today"))
    assert printed.splitlines()[0].split() == ["lock", "package", "pinned", "today"] and "99.0" in printed


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
