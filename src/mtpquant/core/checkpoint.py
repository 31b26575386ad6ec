"""Read Hugging Face checkpoints on disk without loading tensors: config, index, safetensors headers.

Also the byte-level tools the stages share: streaming a tensor's bytes, hashing it, and writing a
safetensors shard from raw byte ranges (so copies are exact and memory stays bounded by a chunk).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from mtpquant.core.errors import MtpquantError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_SHARD = "model.safetensors"
CHUNK = 16 << 20  # bytes per read when streaming tensors: bounds memory, whatever the tensor size

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: Path
    start: int  # absolute byte offset of the data in the shard file
    nbytes: int


MAX_HEADER = 100 << 20  # the safetensors library's own limit on a header's JSON


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise MtpquantError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; a duplicate key, another JSON type or a bad file is one line naming it."""
    try:
        obj = json.loads(Path(path).read_bytes(), object_pairs_hook=_refuse_duplicate_keys)
    except FileNotFoundError:
        raise MtpquantError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise MtpquantError(f"{path}: is a directory, not a JSON file") from None
    except json.JSONDecodeError as exc:
        raise MtpquantError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise MtpquantError(f"{path}: not UTF-8 text") from None
    except MtpquantError as exc:
        raise MtpquantError(f"{path}: {exc}") from None
    if not isinstance(obj, dict):
        raise MtpquantError(f"{path}: a JSON object expected, found {type(obj).__name__}")
    return obj


def _tensor_info(path: Path, name: str, meta: Any, base: int, size: int) -> TensorInfo:
    """One header entry, every field checked: dtype known, shape of non-negative ints, offsets in the file
    and exactly as long as dtype x shape."""
    where = f"{path}: tensor {name}"
    if not isinstance(meta, dict):
        raise MtpquantError(f"{where}: header entry is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise MtpquantError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise MtpquantError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise MtpquantError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if base + end > size:
        raise MtpquantError(f"{where} extends past the end of the file (truncated shard?)")
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_BYTES[dtype] != end - begin:
        raise MtpquantError(f"{where}: {dtype} {shape} needs {numel * DTYPE_BYTES[dtype]} bytes, "
                            f"data_offsets give {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), path, base + begin, end - begin)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one shard's header into TensorInfo records (absolute offsets), bounded and validated: the length
    within the file and MAX_HEADER, a JSON object, valid entries whose data lie inside the file without
    overlapping. Anything else is one line naming the file (and the tensor)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise MtpquantError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > min(size - 8, MAX_HEADER):
                raise MtpquantError(f"{path}: not a safetensors file (header length {hlen} exceeds "
                                    f"{'the file' if hlen > size - 8 else 'the 100 MiB limit'})")
            header = json.loads(fh.read(hlen), object_pairs_hook=_refuse_duplicate_keys)
    except FileNotFoundError:
        raise MtpquantError(f"{path}: shard file not found") from None
    except IsADirectoryError:
        raise MtpquantError(f"{path}: is a directory, not a shard") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise MtpquantError(f"{path}: corrupt safetensors header (not JSON)") from None
    except MtpquantError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise MtpquantError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise MtpquantError(f"{path}: corrupt safetensors header (a JSON object expected)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MtpquantError(f"{path}: __metadata__ must map strings to strings")
    base = 8 + hlen
    out = {name: _tensor_info(path, name, m, base, size) for name, m in header.items() if name != "__metadata__"}
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in out.values() if t.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise MtpquantError(f"{path}: tensors {a} and {b} overlap in the file")
    return out


class Checkpoint:
    """A checkpoint directory: config.json plus safetensors shards, indexed or single-file."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MtpquantError(f"{self.root}: checkpoint directory not found")

    @cached_property
    def config(self) -> dict[str, Any]:
        return read_json(self.root / "config.json")

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    @cached_property
    def index(self) -> dict[str, Any]:
        if self.index_path.exists():
            idx = read_json(self.index_path)
            wm = idx.get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise MtpquantError(f"{self.index_path}: 'weight_map' must map tensor names to shard files")
            for shard in set(wm.values()):
                if Path(shard).name != shard or not shard.endswith(".safetensors"):
                    raise MtpquantError(f"{self.index_path}: shard {shard!r} is not a .safetensors file beside it")
            return idx
        if (self.root / SINGLE_SHARD).exists():
            names = read_safetensors_header(self.root / SINGLE_SHARD)
            return {"metadata": {}, "weight_map": dict.fromkeys(names, SINGLE_SHARD)}
        raise MtpquantError(f"{self.root}: neither {INDEX_NAME} nor {SINGLE_SHARD} found")

    @property
    def weight_map(self) -> dict[str, str]:
        return self.index["weight_map"]

    def shard_files(self) -> list[Path]:
        return sorted(self.root.glob("*.safetensors"))

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor, found by reading each indexed shard's header (the index alone is not trusted)."""
        out: dict[str, TensorInfo] = {}
        for shard in sorted(set(self.weight_map.values())):
            for name, info in read_safetensors_header(self.root / shard).items():
                if name in self.weight_map and self.weight_map[name] == shard:
                    out[name] = info
        missing = sorted(set(self.weight_map) - set(out))
        if missing:
            raise MtpquantError(
                f"{self.index_path}: {len(missing)} indexed tensor(s) not in their shard, first: {missing[0]}"
            )
        return out

    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise MtpquantError(f"{self.root / 'config.json'}: field 'architectures' is missing")
        return archs[0]


def iter_tensor_bytes(info: TensorInfo, fh: BinaryIO | None = None) -> Iterator[bytes]:
    """Yield a tensor's raw bytes in chunks of at most CHUNK bytes."""
    own = fh is None
    fh = fh or info.shard.open("rb")
    try:
        fh.seek(info.start)
        left = info.nbytes
        while left:
            buf = fh.read(min(CHUNK, left))
            if not buf:
                raise MtpquantError(f"{info.shard}: tensor {info.name} is truncated")
            left -= len(buf)
            yield buf
    finally:
        if own:
            fh.close()


def tensor_sha256(info: TensorInfo) -> str:
    h = hashlib.sha256()
    for buf in iter_tensor_bytes(info):
        h.update(buf)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while buf := fh.read(CHUNK):
            h.update(buf)
    return h.hexdigest()


def safetensors_header_bytes(entries: Iterable[tuple[str, str, tuple[int, ...], int]],
                             metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header for tensors laid out back to back in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the safetensors writer does
    return struct.pack("<Q", len(blob)) + blob


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, nbytes: int) -> None:
    """Copy bytes [start, start+nbytes) of src to dst's position: in the kernel where possible."""
    left, pos = nbytes, start
    if hasattr(os, "copy_file_range"):
        dst.flush()
        try:
            while left:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30), pos)
                if n == 0:
                    raise MtpquantError(f"{src.name}: truncated at byte {pos}")
                left, pos = left - n, pos + n
            dst.seek(0, os.SEEK_END)
            return
        except OSError:  # e.g. across filesystems on old kernels: fall back to a bounded buffer
            dst.seek(0, os.SEEK_END)
    src.seek(pos)
    while left:
        buf = src.read(min(CHUNK, left))
        if not buf:
            raise MtpquantError(f"{src.name}: truncated at byte {pos}")
        dst.write(buf)
        left -= len(buf)
        pos += len(buf)


def write_shard_from(sources: list[TensorInfo], out: Path, metadata: dict[str, str] | None = None,
                     on_bytes: Callable[[int], None] | None = None) -> int:
    """Write a safetensors shard holding exact copies of `sources`; returns the tensor bytes written.

    Memory stays bounded whatever the tensor sizes: bytes move file to file (copy_file_range), or through
    a CHUNK-sized buffer where the kernel cannot do it.
    """
    header = safetensors_header_bytes(((s.name, s.dtype, s.shape, s.nbytes) for s in sources), metadata)
    handles: dict[Path, BinaryIO] = {}
    try:
        with Path(out).open("wb") as dst:
            dst.write(header)
            for s in sources:
                src = handles.get(s.shard) or handles.setdefault(s.shard, s.shard.open("rb"))
                _copy_range(src, dst, s.start, s.nbytes)
                if on_bytes:
                    on_bytes(s.nbytes)
            if dst.tell() != len(header) + sum(s.nbytes for s in sources):
                raise MtpquantError(f"{out}: wrote {dst.tell()} bytes, expected more (partial copy)")
    finally:
        for h in handles.values():
            h.close()
    return sum(s.nbytes for s in sources)
