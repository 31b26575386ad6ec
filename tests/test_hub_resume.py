"""An interrupted hub download, through huggingface_hub's real `snapshot_download` (1.33.0, the calibrate lock's).

No hub is reachable here and a dropped connection cannot be caused on a real one, so a small local HTTP server
(stdlib http.server in a thread) stands in for the hub: it answers the endpoints `snapshot_download` calls for a
model repo pinned at a commit (`GET /api/models/{repo}/tree/{commit}`, then `HEAD` and `GET` of
`/{repo}/resolve/{commit}/{file}` with the headers the client reads: X-Repo-Commit, X-Linked-Etag, X-Linked-Size,
Content-Length, Accept-Ranges, Content-Range) and records every request. HF_ENDPOINT points at it.

What huggingface_hub 1.33.0 does with an interrupted download (file_download.http_get and
_download_to_tmp_and_move), and what these tests show through it:
- inside one run, a connection dropped mid-body is resumed with an HTTP Range request from the last byte written
  (up to 5 retries, 1 s apart, each reset by bytes received);
- a run that still fails deletes its partial file: since huggingface_hub PR #4228 the partial download is a
  process-unique `<etag>.<uuid>.incomplete` file, removed on failure, so no `blobs/*.incomplete` survives and the
  next run cannot continue it byte-wise. What the next run keeps is every file already finished (blobs and
  snapshot links): it fetches only the interrupted file, again from byte 0.
`prepare`'s failure is one line (exit 2, no traceback, no RUN/base) naming the file, and what the second run
produced matches the source lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

from mtpquant.model.recipes import FixtureSpec
from mtpquant.tiny.fixture import write_fixture
from tests.test_hub import COMMIT, REPO, one_line_error, write_lock


class StandIn:
    """The stand-in hub: serves `src` as REPO at COMMIT; `drop` names a file whose GETs are interrupted."""

    def __init__(self, src: Path) -> None:
        self.files = {str(p.relative_to(src)): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, file or path, Range header)
        self.drop: str | None = None
        self.drop_every = False  # True: every GET of `drop` fails (the first after 3/4 of its bytes, later at once)
        self.dropped_at: int | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _json(self, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _file(self) -> tuple[str, bytes] | None:
                prefix = f"/{REPO}/resolve/{COMMIT}/"
                name = self.path.split("?")[0].removeprefix(prefix)
                if not self.path.startswith(prefix) or name not in hub.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return None
                return name, hub.files[name]

            def _headers(self, data: bytes) -> None:
                sha = hashlib.sha256(data).hexdigest()
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")

            def do_HEAD(self) -> None:
                found = self._file()
                hub.requests.append(("HEAD", found[0] if found else self.path, None))
                if found:
                    self.send_response(200)
                    self._headers(found[1])
                    self.send_header("Content-Length", str(len(found[1])))
                    self.end_headers()

            def do_GET(self) -> None:
                if self.path.split("?")[0] == f"/api/models/{REPO}/tree/{COMMIT}":
                    hub.requests.append(("GET", "tree", None))
                    return self._json([{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                                        "lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d),
                                                "pointerSize": 134}} for n, d in hub.files.items()])
                found = self._file()
                rng = self.headers.get("Range")
                hub.requests.append(("GET", found[0] if found else self.path, rng))
                if not found:
                    return
                name, data = found
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                dropping = name == hub.drop and (hub.dropped_at is None or hub.drop_every)
                if dropping and hub.dropped_at is not None:  # a retry: the connection goes at once
                    self.close_connection = True
                    return
                self.send_response(206 if start else 200)
                self._headers(data)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if dropping:  # three quarters of the body, then the connection is gone
                    hub.dropped_at = len(data) * 3 // 4
                    self.wfile.write(data[:hub.dropped_at])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, name: str) -> list[str | None]:
        """The Range header of each GET of `name` (None: from byte 0)."""
        return [r for m, n, r in self.requests if m == "GET" and n == name]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Two shards of ~20.9 MB: more than two of the client's 10 MiB read chunks each (it writes whole chunks)."""
    spec = FixtureSpec(n_routed_experts=64, num_shards=2)
    return write_fixture("glm4_moe", spec, tmp_path_factory.mktemp("hub-resume") / "ckpt")


@pytest.fixture
def stand_in(source):
    src, hub = source, StandIn(source)
    yield src, hub
    hub.server.shutdown()
    hub.server.server_close()


def _recipe(tmp_path: Path, src: Path) -> Path:
    lock = write_lock(src, tmp_path / "tiny.lock", REPO, COMMIT)
    recipe = tmp_path / "tiny-hub.yaml"
    recipe.write_text(f"name: tiny-hub\nfamily: glm4_moe\nsource:\n  hub: {REPO}\n  revision: {COMMIT}\n"
                      f"  lock: {lock}\n")
    return recipe


def prepare(hub: StandIn, cache: Path, recipe: Path, run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "mtpquant", "prepare", "--model", str(recipe), "--run", str(run)],
                          capture_output=True, text=True, env=env, timeout=120)


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _written(hub: StandIn) -> int:
    """Where the client's file ended when the connection dropped: it writes the body in whole 10 MiB chunks."""
    assert hub.dropped_at is not None
    return hub.dropped_at // DOWNLOAD_CHUNK_SIZE * DOWNLOAD_CHUNK_SIZE


def _matches_lock(base: Path, lock: Path) -> None:
    want = json.loads(lock.read_text())["files"]
    assert {n: {"size": (base / n).stat().st_size, "sha256": _sha256(base / n)} for n in want} == want
    assert sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) == sorted(want)


def test_a_dropped_connection_is_resumed_with_a_range_request(stand_in, tmp_path):
    src, hub = stand_in
    shard = sorted(n for n in hub.files if n.endswith(".safetensors"))[1]
    hub.drop = shard
    recipe, cache = _recipe(tmp_path, src), tmp_path / "hf"
    r = prepare(hub, cache, recipe, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _written(hub) > 0 and hub.gets(shard) == [None, f"bytes={_written(hub)}-"]  # the rest, not the whole file
    _matches_lock(tmp_path / "run" / "base", tmp_path / "tiny.lock")
    assert not list(cache.rglob("*.incomplete"))


def test_a_failed_download_is_one_line_and_the_next_run_fetches_only_the_rest(stand_in, tmp_path):
    src, hub = stand_in
    shard = sorted(n for n in hub.files if n.endswith(".safetensors"))[1]
    hub.drop, hub.drop_every = shard, True
    recipe, cache, run = _recipe(tmp_path, src), tmp_path / "hf", tmp_path / "run"
    one_line_error(prepare(hub, cache, recipe, run), shard, "interrupted")
    assert not (run / "base").exists()
    # huggingface_hub tried to resume in the run (a Range request from the byte it had), then gave up ...
    assert hub.gets(shard)[:2] == [None, f"bytes={_written(hub)}-"]
    # ... and removed its partial file: nothing half-written stays in the cache
    storage = cache / f"models--{REPO.replace('/', '--')}"
    assert not list(cache.rglob("*.incomplete"))
    finished = {n for n in hub.files if n != shard}
    blobs = {p.name for p in (storage / "blobs").iterdir()}
    assert {hashlib.sha256(hub.files[n]).hexdigest() for n in finished} <= blobs  # the other files are kept

    hub.drop, hub.requests = None, []
    r = prepare(hub, cache, recipe, run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {n for m, n, _ in hub.requests if m == "GET" and n != "tree"} == {shard}  # only the interrupted one
    assert hub.gets(shard) == [None]
    _matches_lock(run / "base", tmp_path / "tiny.lock")
