"""`nox -s images-cuda`: the CUDA images built here for real, checked, published and rebuilt.

For each of calibrate/cuda and serve/cuda, on the project's own Ubuntu base (`.ci/docker-setup --cuda`), wheels
fetched from the index by their lock hashes (`--online`: the wheelhouse would hold a third copy of ~10 GB):
build (seconds, image size, peak disk used), the label check (every lock hash), the in-image checks
(`cuda_checks.py`, no GPU), push to the registry, remove, pull back by digest (same image id), remove, build again
from scratch and push: same digest, or the differences named file by file (mtpquant.images.reproducible).
Everything measured goes to one JSON file (`--results`); the images are removed after each, to free the disk.
Usage: python -m mtpquant.images.release [--registry R] [--base cuda=REF] [--image calibrate|serve] [--results F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from mtpquant.core.errors import MtpquantError, run_command
from mtpquant.images.context import spec
from mtpquant.images.daemon import client
from mtpquant.images.engine import build, drop_build_cache, push, run
from mtpquant.images.labels import label_problems
from mtpquant.images.pins import ROOT, BuildSpec

STATE = Path(os.environ.get("MTPQUANT_DOCKER_STATE", "/var/tmp/mtpquant-docker"))
CHECKS_IN_IMAGE = "/opt/mtpquant/src/mtpquant/images/cuda_checks.py"
RESULTS = ROOT / "benchmarks" / "results" / "images_cuda.json"
FULL_DISK = 0.85  # refuse to start a build past this fraction of the disk used


class DiskPeak:
    """The most bytes used on a filesystem while the block runs (sampled every `every` s), above the start."""

    def __init__(self, path: str = "/", every: float = 2.0) -> None:
        self.path, self.every, self.peak, self._stop = path, every, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, shutil.disk_usage(self.path).used)

    def __enter__(self) -> DiskPeak:
        self.start = self.peak = shutil.disk_usage(self.path).used
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, shutil.disk_usage(self.path).used)

    @property
    def gib(self) -> float:
        return round((self.peak - self.start) / 2**30, 2)


def cuda_base(state: Path = STATE) -> str:
    """The CUDA base .ci/docker-setup --cuda made from Ubuntu packages (it makes it when missing)."""
    ref = state / "base-cuda.ref"
    if not ref.is_file():
        subprocess.run([str(ROOT / ".ci" / "docker-setup"), "--cuda"], check=True, stdout=subprocess.DEVNULL)
    return ref.read_text().strip()


def in_image_checks(ref: str, kind: str, log=print) -> dict[str, Any]:
    """cuda_checks.py run inside the image as its own user, no GPU: {check: {ok, detail}}."""
    lines: list[str] = []
    code = run(ref, ["python", CHECKS_IN_IMAGE, kind], [], log=lines.append)
    for line in lines[:-1]:
        log(line)
    try:
        checks = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise MtpquantError(f"{ref}: the in-image checks printed no JSON (exit {code}): {lines[-3:]}") from None
    return {"exit": code, "checks": checks}


def forget(ref: str) -> None:
    """Remove an image and every tag of it, so that the next use must pull it."""
    c = client()
    img = c.images.get(ref)
    for tag in img.tags:
        c.images.remove(tag, noprune=True)
    if any(i.id == img.id for i in c.images.list(all=True)):
        c.images.remove(img.id, force=True)


def pull_by_digest(s: BuildSpec, digest_ref: str) -> str:
    """Pull repo@sha256:... and tag it as the local ref; returns its image id."""
    repo, digest = digest_ref.split("@")
    img = client().images.pull(repo, tag=digest)
    img.tag(s.repo, f"{s.flavour}-{s.tag}")
    return img.id


def _guard_disk(path: str = "/") -> None:
    u = shutil.disk_usage(path)
    if u.used / (u.used + u.free) > FULL_DISK:
        raise MtpquantError(f"{path} is {u.used / (u.used + u.free):.0%} full (limit {FULL_DISK:.0%}): free some first")


def release(image: str, base: str, registry: str, log=print, save=lambda out: None) -> dict[str, Any]:
    """Build, check, push, pull by digest and rebuild one CUDA image; returns what was measured, and hands what
    is measured so far to `save` after each phase (a run stopped in its rebuild keeps its first build's numbers)."""
    s = spec(image, "cuda", {"cuda": base}, online=True)
    out: dict[str, Any] = {"ref": s.local_ref, "base": base, "revision": s.buildargs["REVISION"]}
    _guard_disk()
    with DiskPeak() as disk:
        t0 = time.monotonic()
        image_id = build(s, log=log, keep_cache=False)
        out["build_seconds"] = round(time.monotonic() - t0, 1)
    attrs = client().images.get(image_id).attrs
    out |= {"image_id": image_id, "size_bytes": attrs["Size"], "peak_disk_gib": disk.gib,
            "labels": attrs["Config"]["Labels"], "label_problems": label_problems(attrs["Config"]["Labels"], image,
                                                                                   "cuda")}
    out["in_image"] = in_image_checks(s.local_ref, image, log)
    save(out)
    first = push(s, registry, log=log)
    forget(s.local_ref)
    out |= {"digest_ref": first, "pulled_id": pull_by_digest(s, first)}
    save(out)
    forget(s.local_ref)  # the rebuild starts with nothing of the first build on the engine
    with DiskPeak() as disk:
        t0 = time.monotonic()
        again = build(s, log=log, no_cache=True, keep_cache=False)
        out["rebuild_seconds"] = round(time.monotonic() - t0, 1)
    out["rebuild_peak_disk_gib"] = disk.gib
    second = push(s, f"{registry}/rebuild", log=log)
    out |= {"rebuild_id": again, "rebuild_digest_ref": second,
            "identical": again == image_id and first.split("@")[1] == second.split("@")[1]}
    if not out["identical"]:  # name what differs (both images on the engine for the diff)
        from mtpquant.images.reproducible import diff

        pull_by_digest(s, first)
        out["residues"] = diff(first, second)
    forget(second)
    drop_build_cache(log)
    return out


def record(path: Path, key: str, value: dict[str, Any]) -> None:
    """One image's results into the JSON file, merged with what other runs wrote there (read at each write)."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, key: value}, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtpquant.images.release", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", default=os.environ.get("MTPQUANT_REGISTRY", "127.0.0.1:5000"))
    p.add_argument("--base", help="cuda=REF: the CUDA base by digest (default: .ci/docker-setup --cuda's)")
    p.add_argument("--image", action="append", choices=["calibrate", "serve"])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    def body() -> int:
        base = args.base.partition("=")[2] if args.base else cuda_base()
        ok = True
        for image in args.image or ["calibrate", "serve"]:
            key = f"{image}-cuda"
            r = release(image, base, args.registry, save=lambda out, key=key: record(args.results, key, out))
            r["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            record(args.results, key, r)
            passed = r["in_image"]["exit"] == 0 and not r["label_problems"]
            ok &= passed and r["pulled_id"] == r["image_id"]
            print(f"{image}-cuda: {r['digest_ref']} {r['size_bytes'] / 2**30:.1f} GiB, built in {r['build_seconds']} s "
                  f"(rebuilt in {r['rebuild_seconds']} s, {'identical' if r['identical'] else 'DIFFERENT'}), peak disk "
                  f"+{r['peak_disk_gib']} GiB, checks {'passed' if passed else 'FAILED'}")
        return 0 if ok else 1

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
