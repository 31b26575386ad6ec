"""Write outputs so that a crash or Ctrl-C never leaves a half-written artifact that looks finished.

Every output goes to a hidden sibling temp path first and is renamed into place only when complete. The temp
name carries its owner (`.NAME.tmp-HOST-PID-XXXX`), so that a stage starting after a killed one (SIGKILL runs no
cleanup) removes what the dead process left, and never the temp of a process that still runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HOST = socket.gethostname().replace("-", "_")  # '-' separates the owner's fields in a temp name
_UMASK = os.umask(0)  # read once, at import: os.umask is process-wide and a writer thread may run later
os.umask(_UMASK)


def _owner_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def remove_stale(final: Path) -> list[Path]:
    """Remove the temp files and dirs of `final` that a dead process on this host left; say so, return them."""
    final = Path(final)
    removed = []
    for p in sorted(final.parent.glob(f".{final.name}.tmp-*")):
        host, _, rest = p.name.removeprefix(f".{final.name}.tmp-").partition("-")
        pid = rest.partition("-")[0]
        if host != HOST or not pid.isdigit() or _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
        print(f"removed {p}: left by process {pid}, which is no longer running", file=sys.stderr)
    return removed


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp dir beside `final`; on success replace `final` with it, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=_owner_prefix(final), dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the artifact is meant to be shared
    old = None
    if final.exists():
        old = final.parent / f"{_owner_prefix(final)}old"  # removed below; if killed first, by the next run
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], None], before_rename: Callable[[], None] | None = None,
                 fsync: bool = True) -> None:
    """`write(tmp)` into an owner-named temp file beside `path` (what dead processes left removed first), fsync,
    then rename to `path`; on error the temp file is deleted. `before_rename`: called between fsync and rename
    (tests kill a process there). `fsync=False` where losing the file in a power cut costs only redoing work
    (a killed process still leaves either the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_owner_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; as a plain open() would
        write(Path(tmp))
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_json(path: Path, obj: Any, fsync: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), fsync)
