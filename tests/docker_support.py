"""Shared by the image tests (marker `docker`): the CPU base, the loopback registry, results, and cleanup.

Disk is the scarce resource on CI machines: each test module removes its images and the build cache when it is
done (`leave_no_images`), builds drop their intermediate images, and free space is recorded before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from mtpquant import images
from mtpquant.pins import locks

STATE = Path(os.environ.get("MTPQUANT_DOCKER_STATE", "/var/tmp/mtpquant-docker"))
REGISTRY = os.environ.get("MTPQUANT_REGISTRY", "127.0.0.1:5000")
RESULTS = Path(os.environ.get("MTPQUANT_DOCKER_RESULTS", STATE / "results.json"))


def base() -> str:
    """The CPU base .ci/docker-setup made from Debian packages and pushed (by digest), or MTPQUANT_BASE_CPU."""
    ref = os.environ.get("MTPQUANT_BASE_CPU", "")
    if not ref and (STATE / "base-cpu.ref").is_file():
        ref = (STATE / "base-cpu.ref").read_text().strip()
    assert "@sha256:" in ref, f"no CPU base: run .ci/docker-setup (writes {STATE / 'base-cpu.ref'})"
    return ref


def record(key: str, value) -> None:
    """Numbers for the report (build seconds, sizes, digests, free disk) in one JSON file beside the engine."""
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True))


def log(line: str) -> None:
    print(line, flush=True)


def free_gib(path: str = "/var/lib/docker") -> float:
    return round(shutil.disk_usage(path if Path(path).exists() else "/").free / 2**30, 1)


def forget(ref: str) -> None:
    """Remove an image and every tag of it, so the next use must pull it."""
    c = images.client()
    img = c.images.get(ref)
    for tag in img.tags:
        c.images.remove(tag, noprune=True)
    if images.exists(img.id):
        c.images.remove(img.id, force=True, noprune=True)


def built_image(image: str) -> tuple[images.BuildSpec, str]:
    s = images.spec(image, "cpu", {"cpu": base()})
    t0 = time.monotonic()
    image_id = images.build(s, log=log, keep_cache=False)
    record(f"{image}-cpu.build_seconds", round(time.monotonic() - t0, 1))
    record(f"{image}-cpu.size_bytes", images.client().images.get(image_id).attrs["Size"])
    record(f"{image}-cpu.free_gib_after_build", free_gib())
    return s, image_id


def publish_remove_pull(s: images.BuildSpec, image_id: str, pinned: Path) -> str:
    """Push to the loopback registry (recorded in a copy of images.lock), remove, pull back by digest."""
    for name in ("images.in", "images.lock"):
        (pinned / name).write_bytes((images.PINNED / name).read_bytes())
    entry = images.publish(s, REGISTRY, log=log, pinned=pinned)
    digest_ref = entry["ref"]
    forget(s.local_ref)
    assert not images.exists(s.local_ref) and not images.exists(image_id)
    lock = locks.read_toml(pinned / "images.lock")
    assert images.pull(s, log=log, build_fallback=False, images_lock=lock) == s.local_ref
    assert images.client().images.get(s.local_ref).id == image_id
    assert digest_ref in images.client().images.get(s.local_ref).attrs["RepoDigests"]
    return digest_ref


@pytest.fixture(scope="module", autouse=True)
def leave_no_images(request):
    """Images are GBs: remove this project's images (all tags, registry ones too) and the build cache after."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    record(f"{name}.free_gib_before", free_gib())
    yield
    c = images.client()
    for img in c.images.list():
        if any(f"{images.NAMESPACE}-" in tag for tag in img.tags):
            c.images.remove(img.id, force=True)
    images.drop_build_cache(log)
    record(f"{name}.free_gib_after", free_gib())
