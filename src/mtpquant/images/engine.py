"""Build, push, publish, pull and run images through the Docker engine (legacy builder: no BuildKit)."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtpquant.core.errors import MtpquantError
from mtpquant.images.context import fill_wheelhouse, write_context
from mtpquant.images.daemon import client
from mtpquant.images.pins import FLAVOURS, PINNED, BuildSpec, load_images_lock
from mtpquant.images.reproducible import normalize as canonical
from mtpquant.pins import kernels, locks


def _stream(lines: Iterator[dict], log) -> None:
    for chunk in lines:
        if "error" in chunk:
            raise MtpquantError(f"docker: {chunk['error'].strip()}")
        if text := chunk.get("stream", "").rstrip():
            log(text)
        elif "status" in chunk and chunk.get("progress") is None:
            log(f"{chunk['status']} {chunk.get('id', '')}".strip())


def build(s: BuildSpec, log=print, no_cache: bool = False, normalize: bool = True,
          keep_cache: bool = True) -> str:
    """Build the image (air-gapped when a wheelhouse is used: no network in RUN steps); returns its id.
    normalize: replace it by its canonical copy (mtpquant.images.reproducible), so that the same inputs give the
    same image id and digest; the legacy builder's raw output differs in every timestamp.
    keep_cache=False: drop the build's intermediate images after it (see drop_build_cache)."""
    unresolved = kernels.unresolved(kernels.load(PINNED / "kernels.lock", strict=False)) if "KERNELS" in \
        s.buildargs else []
    if unresolved:
        raise MtpquantError(f"pinned/kernels.lock: {', '.join(unresolved)} not resolved to a commit; "
                            "run `nox -s lock` where GitHub is reachable")
    c = client()
    if s.wheelhouse is not None:
        subprocess.run(fill_wheelhouse(s), check=True)
    fl = FLAVOURS[s.image][s.flavour]
    # Air-gapped for real where nothing else needs the network: no kernel sources to fetch, no OS packages.
    offline = s.wheelhouse is not None and not fl.kernels and not fl.apt_packages
    with tempfile.TemporaryFile() as ctx:
        write_context(s, ctx)
        ctx.seek(0)
        _stream(c.api.build(fileobj=ctx, custom_context=True, dockerfile=s.dockerfile, tag=s.local_ref,
                            buildargs=s.buildargs, rm=True, forcerm=True, pull=False, nocache=no_cache,
                            network_mode="none" if offline else None, decode=True), log)
    if not keep_cache:
        drop_build_cache(log)  # before normalizing: the build stage's wheelhouse and venv are no longer needed
    if normalize:
        raw = c.images.get(s.local_ref).id
        canonical(s.local_ref, s.local_ref)
        if raw != c.images.get(s.local_ref).id:
            c.images.remove(raw, noprune=True)  # its parents stay: they are the build cache
    if not keep_cache:
        drop_build_cache(log)
    return c.images.get(s.local_ref).id


def drop_build_cache(log=print) -> None:
    """Remove untagged images: the legacy builder's intermediate steps, which hold the build stage's wheelhouse
    and venv and the raw image under the normalized one (for the serving image, ~3x its size). The next build
    starts cold; on a small disk that is the price of building at all."""
    freed = client().images.prune(filters={"dangling": True}).get("SpaceReclaimed") or 0
    log(f"build cache dropped: {freed / 2**30:.1f} GiB freed")


def exists(ref: str) -> bool:
    import docker

    try:
        client().images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def push(s: BuildSpec, registry: str, log=print) -> str:
    """Push the built image to REGISTRY/mtpquant-<image>:<flavour>-<tag>; returns repo@digest."""
    c = client()
    repo = f"{registry.rstrip('/')}/{s.repo}"
    tag = f"{s.flavour}-{s.tag}"
    c.images.get(s.local_ref).tag(repo, tag)
    _stream(c.images.push(repo, tag, stream=True, decode=True), log)
    digests = [d for d in c.images.get(f"{repo}:{tag}").attrs.get("RepoDigests", []) if d.startswith(repo + "@")]
    if not digests:
        raise MtpquantError(f"{repo}:{tag}: pushed, but the engine reports no digest")
    return digests[0]


def publish(s: BuildSpec, registry: str, log=print, pinned: Path = PINNED) -> dict[str, str]:
    """Push, then record the pushed digest in images.lock (what `pull` fetches)."""
    ref = push(s, registry, log)
    entry = {"ref": ref, "content_tag": s.tag, "revision": s.buildargs["REVISION"],
             "lock_sha256": s.buildargs["LOCK_SHA256"]}
    locks.record_published(pinned, s.key, entry)
    return entry


def pull(s: BuildSpec, log=print, build_fallback: bool = True, images_lock: dict | None = None) -> str:
    """The published image by digest when it was built from these inputs, else a local build (said so)."""
    if exists(s.local_ref):
        log(f"{s.local_ref}: present")
        return s.local_ref
    pub = (images_lock or load_images_lock()).get("published", {}).get(s.key)
    why = None
    if pub is None:
        why = f"pinned/images.lock publishes no {s.key}"
    elif pub["content_tag"] != s.tag:
        why = f"the published {s.key} was built from other inputs (tag {pub['content_tag']}, here {s.tag})"
    else:
        import docker

        try:
            repo, digest = pub["ref"].split("@")
            img = client().images.pull(repo, tag=digest)
            img.tag(s.repo, f"{s.flavour}-{s.tag}")
            log(f"pulled {pub['ref']} -> {s.local_ref}")
            return s.local_ref
        except docker.errors.APIError as e:
            why = f"pulling {pub['ref']} failed ({e.explanation or e})"
    if not build_fallback:
        raise MtpquantError(why)
    log(f"{why}: building {s.local_ref} instead")
    build(s, log)
    return s.local_ref


def run(ref: str, argv: list[str], mounts: list[str], user: str | None = None, gpus: bool = False,
        shm_size: str | None = None, env: dict[str, str] | None = None, log=print) -> int:
    """Run one command in a container of `ref`, streaming its output; returns its exit code."""
    import docker

    c = client()
    volumes = {m: {"bind": m, "mode": "rw"} for m in mounts}
    kwargs: dict[str, Any] = {"volumes": volumes, "environment": env or {}, "user": user, "shm_size": shm_size,
                              "detach": True, "working_dir": "/work"}
    if gpus:
        kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    box = c.containers.run(ref, argv, **kwargs)
    try:
        for line in box.logs(stream=True, follow=True):
            log(line.decode(errors="replace").rstrip())
        return box.wait()["StatusCode"]
    finally:
        box.remove(force=True)

