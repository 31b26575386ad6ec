"""Are two builds of one image the same bytes? What differs, and the normalization that removes what it can.

`diff A B` saves both images (`docker save`) and compares their configs and, layer by layer, every file's
metadata and content, naming the differences by kind (mtime, content, mode, ...). `normalize REF` rewrites an
image the way BuildKit's SOURCE_DATE_EPOCH rewrite would (the legacy builder has none): file mtimes clamped to
SOURCE_DATE_EPOCH, tar headers canonical (sorted, no atime/ctime, numeric owners), and the config's build-time
fields (created, history times, the build container's id and hostname) fixed; it loads the result as a new
image whose id is a function of its content.
Usage: python -m mtpquant.images.reproducible diff A B [--json OUT] | normalize REF [--tag NEW]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtpquant.core.errors import MtpquantError, run_command
from mtpquant.images.daemon import client
from mtpquant.images.pins import SOURCE_DATE_EPOCH
from mtpquant.pins.locks import EXCLUDE_NEWER

# Config fields the legacy builder fills with per-build values.
BUILD_FIELDS = ("created", "container", "container_config", "docker_version")
EPOCH_ISO = EXCLUDE_NEWER  # the image config times: the locks' date, like SOURCE_DATE_EPOCH


class _ChunkReader(io.RawIOBase):
    """A read-only stream over an iterator of byte chunks (what the Docker SDK streams). Each chunk is handed
    out through a memoryview, so tarfile's many small reads copy each byte once."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._rest = iter(chunks), memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self._rest:
            self._rest = memoryview(next(self._chunks, b""))
        n = min(len(b), len(self._rest))
        b[:n], self._rest = self._rest[:n], self._rest[n:]
        return n


def save(ref: str, dest: Path) -> tuple[dict[str, Any], list[Path]]:
    """docker save REF into dest, extracted as it streams (one copy on disk): (config, layer tars in order)."""
    dest.mkdir(parents=True, exist_ok=True)
    stream = io.BufferedReader(_ChunkReader(client().images.get(ref).save(named=False)), 1 << 20)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        tar.extractall(dest, filter="data")
    manifest = json.loads((dest / "manifest.json").read_text())[0]
    config = json.loads((dest / manifest["Config"]).read_text())
    return config, [dest / layer for layer in manifest["Layers"]]


def _tar_stream(files: list[tuple[str, Path]], chunk: int = 1 << 20) -> Iterator[bytes]:
    """An uncompressed tar of `files` (name, path) as byte chunks, each file deleted once sent: an image the
    size of the disk's free space can be loaded without a second copy of it."""
    for name, path in files:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = path.stat().st_size, SOURCE_DATE_EPOCH, 0o644
        yield info.tobuf(tarfile.PAX_FORMAT)
        with path.open("rb") as f:
            while block := f.read(chunk):
                yield block
        if info.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
        path.unlink()
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)


def _sha256(fileobj) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: fileobj.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def entries(layer: Path) -> dict[str, dict[str, Any]]:
    """name -> metadata and content hash of every member of a layer tar."""
    out = {}
    with tarfile.open(layer) as tar:
        for m in tar:
            content = _sha256(tar.extractfile(m)) if m.isfile() else m.linkname
            out[m.name] = {"type": m.type.decode(), "mode": m.mode, "uid": m.uid, "gid": m.gid, "mtime": m.mtime,
                           "content": content, "pax": sorted(k for k in m.pax_headers if k != "path")}
    return out


def _kinds(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in ("content", "mode", "uid", "gid", "type", "mtime", "pax") if a[k] != b[k]]


def diff_layers(a: Path, b: Path, examples: int = 8) -> dict[str, Any]:
    ea, eb = entries(a), entries(b)
    only_a, only_b = sorted(set(ea) - set(eb)), sorted(set(eb) - set(ea))
    by_kind: Counter[str] = Counter()
    content: list[str] = []
    for name in sorted(set(ea) & set(eb)):
        kinds = _kinds(ea[name], eb[name])
        by_kind.update(kinds)
        if "content" in kinds:
            content.append(name)
    return {"files": len(ea), "only_in_a": only_a[:examples], "only_in_b": only_b[:examples],
            "n_only_in_a": len(only_a), "n_only_in_b": len(only_b), "differ_by": dict(by_kind),
            "content_differs": content[:examples * 4], "n_content_differs": len(content)}


def diff(ref_a: str, ref_b: str) -> dict[str, Any]:
    c = client()
    report: dict[str, Any] = {"a": ref_a, "b": ref_b, "image_id": [c.images.get(r).id for r in (ref_a, ref_b)]}
    with tempfile.TemporaryDirectory(prefix="mtpquant-diff-") as tmp:
        ca, la = save(ref_a, Path(tmp) / "a")
        cb, lb = save(ref_b, Path(tmp) / "b")
        report["config_differs"] = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        report["history_created_differs"] = [h1.get("created") != h2.get("created")
                                              for h1, h2 in zip(ca.get("history", []), cb.get("history", []),
                                                                strict=False)].count(True)
        steps = [h.get("created_by", "")[-90:] for h in ca.get("history", []) if not h.get("empty_layer")]
        layers = []
        for i, (a, b) in enumerate(zip(la, lb, strict=False)):
            same = ca["rootfs"]["diff_ids"][i] == cb["rootfs"]["diff_ids"][i]
            layer = {"index": i, "step": steps[i] if i < len(steps) else "", "same": same,
                     "diff_id": ca["rootfs"]["diff_ids"][i]}
            if not same:
                layer |= diff_layers(a, b)
            layers.append(layer)
        report["layers"] = layers
        report["n_layers"] = [len(la), len(lb)]
    report["identical"] = report["image_id"][0] == report["image_id"][1]
    return report


def normalize_layer(src: Path, dst: Path, epoch: int = SOURCE_DATE_EPOCH) -> str:
    """Rewrite a layer tar canonically; returns its diff_id (sha256 of the new tar)."""
    with tarfile.open(src) as tin, dst.open("wb") as raw:
        members = sorted(tin.getmembers(), key=lambda m: m.name)
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tout:
            for m in members:
                m.mtime = min(int(m.mtime), epoch)
                m.uname = m.gname = ""
                m.pax_headers = {k: v for k, v in m.pax_headers.items()
                                 if k not in ("atime", "ctime", "mtime", "uname", "gname")}
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
    with dst.open("rb") as f:
        return "sha256:" + _sha256(f)


def normalize(ref: str, tag: str | None = None, epoch: int = SOURCE_DATE_EPOCH) -> str:
    """Load a canonical copy of `ref` (see the module docstring); returns the new image id."""
    c = client()
    with tempfile.TemporaryDirectory(prefix="mtpquant-norm-") as tmp:
        config, layers = save(ref, Path(tmp) / "in")
        out = Path(tmp) / "out"
        out.mkdir()
        diff_ids, names = [], []
        for i, layer in enumerate(layers):
            name = f"layer{i:03d}.tar"
            diff_ids.append(normalize_layer(layer, out / name, epoch))
            names.append(name)
            if layer not in layers[i + 1:]:  # (an empty layer may repeat)
                layer.unlink()
        for k in BUILD_FIELDS:
            config.pop(k, None)
        config["created"] = EPOCH_ISO
        config.get("config", {}).pop("Image", None)  # the id of the build's last intermediate image
        for h in config.get("history", []):
            h["created"] = EPOCH_ISO
        config["rootfs"]["diff_ids"] = diff_ids
        blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        image_id = "sha256:" + hashlib.sha256(blob).hexdigest()
        (out / f"{image_id[7:]}.json").write_bytes(blob)
        repo_tags = [tag] if tag else []
        (out / "manifest.json").write_text(json.dumps([{"Config": f"{image_id[7:]}.json", "RepoTags": repo_tags,
                                                        "Layers": names}]))
        members = [(p.name, p) for p in sorted(out.iterdir())]
        for chunk in c.api.load_image(_tar_stream(members), quiet=True):
            if "error" in chunk:
                raise MtpquantError(f"docker load of the normalized {ref}: {chunk['error'].strip()}")
    return image_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtpquant.images.reproducible", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    d = sub.add_parser("diff")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--json", type=Path)
    n = sub.add_parser("normalize")
    n.add_argument("ref")
    n.add_argument("--tag")
    args = p.parse_args(argv)

    def body() -> int:
        if args.action == "diff":
            report = diff(args.a, args.b)
            text = json.dumps(report, indent=1)
            if args.json:
                args.json.write_text(text)
            print(text)
            return 0 if report["identical"] else 1
        print(normalize(args.ref, args.tag))
        return 0

    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
