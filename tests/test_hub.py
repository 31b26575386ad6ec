"""`prepare` from a hub repo at a pinned commit, through huggingface_hub's real snapshot_download, offline, from a
cache laid out as the hub's client writes it (blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/..,
refs/main). Every refusal is one line and exit 2, before anything is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtpquant.model.recipes import FixtureSpec
from mtpquant.tiny.fixture import write_fixture

REPO = "tiny-org/tiny-glm4"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_hub_cache(src: Path, cache: Path, repo: str, commit: str) -> Path:
    """`src`'s files as huggingface_hub caches a download of `repo` at `commit`; returns the snapshot folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        blob = storage / "blobs" / _sha256(f)
        shutil.copyfile(f, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def write_lock(src: Path, path: Path, repo: str, commit: str) -> Path:
    files = {str(f.relative_to(src)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(src.rglob("*")) if f.is_file()}
    path.write_text(json.dumps({"format": 1, "repo": repo, "revision": commit, "files": files}))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_fixture("glm4_moe", FixtureSpec(num_shards=3), tmp_path_factory.mktemp("hub-src") / "ckpt")


@pytest.fixture
def hub(tmp_path, source):
    """(cache, snapshot, recipe path, lock path) for REPO pinned at COMMIT, cached and locked."""
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(source, cache, REPO, COMMIT)
    lock = write_lock(source, tmp_path / "tiny.lock", REPO, COMMIT)
    recipe = tmp_path / "tiny-hub.yaml"
    recipe.write_text(f"name: tiny-hub\nfamily: glm4_moe\nsource:\n  hub: {REPO}\n  revision: {COMMIT}\n"
                      f"  lock: {lock}\n")
    return cache, snapshot, recipe, lock


def prepare(cache: Path, recipe: Path, run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "mtpquant", "prepare", "--model", str(recipe), "--run", str(run)],
                          capture_output=True, text=True, env=env, timeout=300)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_prepare_from_the_cache_links_the_checked_snapshot(hub, tmp_path, source):
    cache, snapshot, recipe, lock = hub
    r = prepare(cache, recipe, tmp_path / "run")
    assert r.returncode == 0, r.stderr
    base = tmp_path / "run" / "base"
    assert base.is_symlink() and base.resolve() == snapshot.resolve()
    assert {p.name: _sha256(p) for p in base.iterdir()} == {p.name: _sha256(p) for p in source.iterdir()}
    rec = json.loads((tmp_path / "run" / "prepare.json").read_text())
    assert rec["source"]["revision"] == COMMIT and rec["source"]["files"] == len(list(source.iterdir()))
    assert rec["source"]["lock_sha256"] == _sha256(lock)


def test_a_revision_not_in_the_cache(hub, tmp_path, source):
    cache, _, recipe, lock = hub
    write_lock(source, lock, REPO, OTHER)
    recipe.write_text(recipe.read_text().replace(COMMIT, OTHER))
    one_line_error(prepare(cache, recipe, tmp_path / "run"), OTHER, "not in the hub cache")
    assert not (tmp_path / "run" / "base").exists()


def test_a_lock_for_another_commit(hub, tmp_path, source):
    cache, _, recipe, lock = hub
    write_lock(source, lock, REPO, OTHER)
    one_line_error(prepare(cache, recipe, tmp_path / "run"), str(lock), OTHER, COMMIT)


def test_a_missing_shard(hub, tmp_path):
    cache, snapshot, recipe, _ = hub
    shard = sorted(snapshot.glob("*.safetensors"))[1]
    shard.unlink()
    one_line_error(prepare(cache, recipe, tmp_path / "run"), "missing", shard.name)
    assert not (tmp_path / "run" / "base").exists()


def test_a_blob_whose_sha256_differs_from_the_lock(hub, tmp_path):
    cache, snapshot, recipe, _ = hub
    shard = sorted(snapshot.glob("*.safetensors"))[0]
    blob = shard.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte of tensor data flipped
    blob.write_bytes(bytes(data))
    one_line_error(prepare(cache, recipe, tmp_path / "run"), shard.name, "sha256", "corrupt")


def test_a_file_the_lock_does_not_list(hub, tmp_path):
    cache, snapshot, recipe, _ = hub
    (snapshot / "extra.safetensors").write_bytes(b"x")
    one_line_error(prepare(cache, recipe, tmp_path / "run"), "extra.safetensors", "not in the source lock")


def test_no_lock(hub, tmp_path):
    cache, _, recipe, lock = hub
    lock.unlink()
    one_line_error(prepare(cache, recipe, tmp_path / "run"), "no source lock", "lock-sources")


def test_a_corrupt_lock(hub, tmp_path):
    cache, _, recipe, lock = hub
    lock.write_text(json.dumps({"repo": REPO, "revision": COMMIT, "files": {"a": {"size": "big"}}}))
    one_line_error(prepare(cache, recipe, tmp_path / "run"), str(lock), "not a source lock")
