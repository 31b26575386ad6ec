"""The Hugging Face hub, downloading: a model recipe's base at its pinned commit, through huggingface_hub's own
code and cache, checked against the recipe's source lock before anything is loaded.

A source lock (`pinned/sources/<model>.lock`, JSON) lists every file `prepare` downloads at the pinned commit
with its size and sha256 (the LFS sha256 the hub reports; small files hashed after download). It is written by
`mtpquant lock-sources MODEL...` (`nox -s lock-sources -- MODEL...`) where the hub answers, never by hand.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_write_bytes
from mtpquant.core.checkpoint import read_json
from mtpquant.core.errors import MtpquantError

# What `prepare` takes from a model repo (weights, configs, tokenizer, chat template); the lock lists the same.
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
LOCK_FORMAT = 1


@dataclass(frozen=True)
class LockedFile:
    size: int
    sha256: str


@dataclass(frozen=True)
class SourceLock:
    path: Path
    repo: str
    revision: str
    files: dict[str, LockedFile]


def lock_path(model_name: str) -> Path:
    from mtpquant.model.recipes import REPO_ROOT

    return REPO_ROOT / "pinned" / "sources" / f"{model_name}.lock"


def lock_for(recipe: Any) -> Path:
    """The source lock of a model recipe with a hub source."""
    from mtpquant.model.recipes import REPO_ROOT

    given = recipe.source.lock
    if given is None:
        return lock_path(recipe.name)
    return Path(given) if Path(given).is_absolute() else REPO_ROOT / given


def read_lock(path: Path) -> SourceLock:
    if not path.is_file():
        raise MtpquantError(f"{path}: no source lock; write it where the hub answers: "
                            f"`nox -s lock-sources -- {path.stem}`")
    data = read_json(path)
    try:
        files = {name: LockedFile(int(e["size"]), str(e["sha256"])) for name, e in data["files"].items()}
        lock = SourceLock(path, str(data["repo"]), str(data["revision"]), files)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MtpquantError(f"{path}: not a source lock ({type(e).__name__}: {e}); regenerate it") from None
    if not files:
        raise MtpquantError(f"{path}: lists no files")
    return lock


def check_lock_matches(lock: SourceLock, repo: str, revision: str, recipe: Path) -> None:
    if (lock.repo, lock.revision) != (repo, revision):
        raise MtpquantError(f"{lock.path}: locks {lock.repo}@{lock.revision}, but {recipe} pins {repo}@{revision}; "
                            "regenerate the lock for the pinned commit")


def check_snapshot(snapshot: Path, lock: SourceLock) -> None:
    """Every locked file present with its size and sha256, and nothing the lock does not list: one line each."""
    from huggingface_hub.utils import filter_repo_objects

    from mtpquant.chain.manifest import compare_files

    present = {str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file() or p.is_symlink()}
    present = set(filter_repo_objects(sorted(present), allow_patterns=PATTERNS))
    found = compare_files({n: snapshot / n for n in present},
                          {n: (want.size, want.sha256) for n, want in lock.files.items()})
    if found["missing"]:
        missing = found["missing"]
        raise MtpquantError(f"{snapshot}: {len(missing)} file(s) of {lock.path.name} missing: "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if found["extra"]:
        raise MtpquantError(f"{snapshot}: {found['extra'][0]} is not in the source lock {lock.path}")
    for name in found["changed"]:
        want, size = lock.files[name], (snapshot / name).stat().st_size
        if size != want.size:
            raise MtpquantError(f"{snapshot / name}: {size} bytes, the source lock {lock.path.name} says {want.size}")
        raise MtpquantError(f"{snapshot / name}: sha256 differs from the source lock {lock.path.name} "
                            f"({want.sha256[:12]}...); the download is corrupt or the lock is wrong")


def download(repo: str, revision: str, lock: SourceLock) -> Path:
    """The snapshot folder of `repo` at `revision` in huggingface_hub's cache (downloading what is missing; only from
    the cache when HF_HUB_OFFLINE=1), checked against `lock`.

    An interrupted download, as huggingface_hub 1.33 does it (tests/test_hub_resume.py shows it): a dropped
    connection is resumed within the run with an HTTP Range request from the last 10 MiB chunk written (5 retries);
    when those fail, the partial file (process-unique `<etag>.<uuid>.incomplete`) is deleted, so the next run
    fetches that file again from byte 0 and keeps every file already finished."""
    import httpx
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    retries: list[str] = []
    try:
        with _hub_warnings(retries):
            folder = snapshot_download(repo, revision=revision, allow_patterns=PATTERNS,
                                       local_files_only=constants.HF_HUB_OFFLINE)
    except LocalEntryNotFoundError:
        raise MtpquantError(f"{repo}@{revision}: not in the hub cache {constants.HF_HUB_CACHE} and the hub is not "
                            "reachable (HF_HUB_OFFLINE or no network)") from None
    except HfHubHTTPError as e:
        raise MtpquantError(f"{repo}@{revision}: {str(e).splitlines()[0]}") from None
    except httpx.TransportError as e:  # the connection dropped (and huggingface_hub's resumes failed)
        raise MtpquantError(_interrupted(repo, revision, e, retries)) from None
    except OSError as e:  # its size check after a short body ("Consistency check failed"), or the cache's disk
        if "Consistency check failed" in str(e):
            raise MtpquantError(_interrupted(repo, revision, e, retries)) from None
        raise MtpquantError(f"{repo}@{revision}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]} "
                            f"(hub cache {constants.HF_HUB_CACHE})") from None
    snapshot = Path(folder)
    check_snapshot(snapshot, lock)
    return snapshot


@contextmanager
def _hub_warnings(into: list[str]):
    """huggingface_hub's log lines (its "Trying to resume download..." retries) collected in `into`, not printed:
    a failure is reported in one line that counts them."""
    import logging

    log = logging.getLogger("huggingface_hub")
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: into.append(record.getMessage())  # type: ignore[method-assign]
    saved = log.handlers[:], log.propagate
    log.handlers, log.propagate = [handler], False
    try:
        yield
    finally:
        log.handlers, log.propagate = saved


def _interrupted(repo: str, revision: str, e: Exception, retries: list[str]) -> str:
    """One line for a download that failed mid-way: which file, why, how often huggingface_hub resumed it."""
    import httpx

    what = f"{repo}@{revision}"
    if isinstance(e, httpx.RequestError):
        with suppress(RuntimeError):  # an error without its request keeps the repo alone
            what = f"{repo}@{revision}: {str(e.request.url).partition(f'/resolve/{revision}/')[2] or e.request.url}"
    resumed = sum("Trying to resume download" in line for line in retries)
    why = (str(e).splitlines() or [type(e).__name__])[0].rstrip(".")
    return (f"{what}: download interrupted ({type(e).__name__}: {why}"
            f"{f'; its {resumed} resume attempt(s) failed too' if resumed else ''}); finished files stay in the "
            f"hub cache, `prepare` again fetches the rest")


# ---- writing a lock (where the hub answers) -----------------------------------------------------------------


def lock_entries(repo: str, revision: str) -> dict[str, LockedFile]:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import filter_repo_objects

    from mtpquant.core.checkpoint import file_sha256

    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    if info.sha != revision:
        raise MtpquantError(f"{repo}: the hub resolved {revision} to {info.sha}; pin a 40-hex commit")
    siblings = {s.rfilename: s for s in info.siblings or []}
    out: dict[str, LockedFile] = {}
    for name in filter_repo_objects(sorted(siblings), allow_patterns=PATTERNS):
        s = siblings[name]
        if s.lfs is not None:
            out[name] = LockedFile(int(s.lfs.size), str(s.lfs.sha256))
        else:  # a small git file: the hub gives its git sha1 only
            local = Path(hf_hub_download(repo, name, revision=revision))
            out[name] = LockedFile(local.stat().st_size, file_sha256(local))
    return out


def write_lock(repo: str, revision: str, out: Path) -> Path:
    files = lock_entries(repo, revision)
    body = {"format": LOCK_FORMAT, "repo": repo, "revision": revision,
            "written_by": "mtpquant lock-sources (nox -s lock-sources); never edit by hand",
            "files": {n: {"size": f.size, "sha256": f.sha256} for n, f in sorted(files.items())}}
    atomic_write_bytes(out, (json.dumps(body, indent=1) + "\n").encode())
    return out


def lock_models(refs: list[str]) -> list[Path]:
    """Write the source lock of each model recipe (a hub repo at a pinned commit)."""
    from mtpquant.model import recipes

    out = []
    for ref in refs:
        path = recipes.resolve_path("models", ref)
        recipe = recipes.load("models", path)
        src = recipe.source
        if src.hub is None or src.revision in (None, recipes.UNPINNED):
            raise MtpquantError(f"{path}: source must be a hub repo at a pinned commit to lock it")
        out.append(write_lock(src.hub, src.revision, lock_for(recipe)))
    return out


def describe(lock: SourceLock) -> dict[str, Any]:
    return {"lock": str(lock.path), "files": len(lock.files), "bytes": sum(f.size for f in lock.files.values())}
