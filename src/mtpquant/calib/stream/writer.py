"""The stream engine's files: a layer's packed shard and the activations at its boundary, streamed as safetensors
bytes from where the tensors are, hashed as they are written, atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mtpquant.calib.stream.journal import kill_point
from mtpquant.core.atomic import atomic_write
from mtpquant.core.checkpoint import safetensors_header_bytes
from mtpquant.core.errors import MtpquantError

ACTS_FORMAT = "mtpquant-activations-1"


def _acts_entries(hidden: list[Any], tops: list[Any]) -> list[tuple[str, Any]]:
    """The activations at a layer boundary as named tensors: `hidden.B` per batch, `topk.B` where the layer
    passed top-k indices on (GLM-5's indexer)."""
    out = [(f"hidden.{b}", h) for b, h in enumerate(hidden)]
    out += [(f"topk.{b}", t) for b, t in enumerate(tops) if t is not None]
    return out


WRITE_CHUNK = 64 << 20  # bytes per staging buffer of StreamWriter (two of them)


FLUSH_BYTES = 256 << 20  # StreamWriter starts writeback (fdatasync on its flush thread) every this many bytes


class StreamWriter:
    """Writes tensors, wherever they are, as one safetensors file, hashing the bytes as they go: no host copy of
    the whole set (the activations are ~6 GB at GLM-5.2's 393K tokens, a packed layer ~1-4 GB), no second read to
    hash. Host tensors of a chunk or more are written from their own memory; device tensors, and smaller host
    ones, are packed into two reused staging buffers (page-locked when CUDA is there), device copies on a side
    stream that first waits for what the compute stream queued so far. The three steps overlap: while chunk k
    is hashed (the hash thread) and written (this thread) at once, chunk k+1 is copied from the device. Why:
    on the H200 the first version (one 16 MiB buffer, copy, hash and write taking turns in one thread) wrote
    0.53 GB/s to a disk that takes 1.72 GB/s; each turn also waited for the GIL, which the thread driving the
    GPU holds most of the time. The caller keeps the tensors alive until write returns."""

    def __init__(self, chunk: int = WRITE_CHUNK, pin: bool = False):
        self.chunk = chunk
        self.pin = pin
        self.stages: list[Any] = []
        self.stream = None
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="stream-hash")
        self.flusher = ThreadPoolExecutor(1, thread_name_prefix="stream-flush")

    def close(self) -> None:
        self.hasher.shutdown()
        self.flusher.shutdown()
        self.stages = []

    def _stage(self, k: int) -> Any:
        import torch

        while len(self.stages) <= k:
            self.stages.append(torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.pin))
        return self.stages[k]

    def _chunks(self, named: list[tuple[str, Any]]) -> Iterator[memoryview]:
        """The tensors' bytes in order, in chunks of at most `chunk`. Device tensors, and host tensors smaller
        than a chunk, are packed back to back into the staging buffers; a full buffer is yielded once its copies
        are done, with the next one's copies already queued (its buffer is the one the caller finished with).
        Why pack: a packed layer is hundreds of small tensors (scales, zero points, shapes), and one copy, sync,
        hash hand-off and write per tensor made the H200's shard writes 0.3-0.4 GB/s on a ~1.1 GB/s disk.
        Host tensors of a chunk or more are written from their own memory."""
        import torch

        pending: tuple[Any, memoryview] | None = None  # a filled buffer: (its copies' event or None, bytes)
        stage: Any = None
        fill = 0
        queued = False  # device copies into `stage` on the side stream
        k = 0  # buffers filled so far
        waited = False

        def seal() -> tuple[Any, memoryview]:
            nonlocal stage, fill, queued
            done = None
            if queued:
                done = torch.cuda.Event()
                done.record(self.stream)
            out = (done, memoryview(stage[:fill].numpy()))
            stage, fill, queued = None, 0, False
            return out

        def rotate() -> Iterator[memoryview]:
            """Seal the buffer being filled; hand out the one before it (its copies done)."""
            nonlocal pending
            sealed = seal()
            yield from drain()
            pending = sealed

        def drain() -> Iterator[memoryview]:
            """Hand out the sealed buffer, if any, once its copies are done."""
            nonlocal pending
            if pending is not None:
                _wait(pending[0])
                yield pending[1]
                pending = None

        for _, t in named:
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            size = flat.numel()
            if flat.device.type == "cpu" and size >= self.chunk:
                if stage is not None:
                    yield from rotate()
                yield from drain()
                for a in range(0, size, self.chunk):
                    yield memoryview(flat[a:a + self.chunk].numpy())
                continue
            if flat.device.type != "cpu":
                if self.stream is None:
                    self.stream = torch.cuda.Stream(device=flat.device)
                if not waited:  # the side stream starts after what the compute stream queued so far
                    self.stream.wait_stream(torch.cuda.current_stream(flat.device))
                    waited = True
                flat.record_stream(self.stream)  # a temporary (.contiguous()) is not reused while copied
            a = 0
            while a < size:
                if stage is None:
                    stage = self._stage(k % 2)
                    k += 1
                n = min(self.chunk - fill, size - a)
                if flat.device.type == "cpu":
                    stage[fill:fill + n].copy_(flat[a:a + n])
                else:
                    with torch.cuda.stream(self.stream):
                        stage[fill:fill + n].copy_(flat[a:a + n], non_blocking=True)
                    queued = True
                fill += n
                a += n
                if fill == self.chunk:
                    yield from rotate()
        if stage is not None and fill:
            yield from rotate()
        yield from drain()

    def write(self, path: Path, named: list[tuple[str, Any]], metadata: dict[str, str] | None = None) -> str:
        """The file's sha256. `named`: (name, tensor) in file order (dtype, shape from the tensors)."""
        h = hashlib.sha256()
        header = safetensors_header_bytes(
            [(n, st_dtype(t), tuple(t.shape), t.numel() * t.element_size()) for n, t in named], metadata)
        flushed: Future | None = None
        unflushed = 0
        with open(path, "wb", buffering=0) as fh:
            try:
                h.update(header)
                _write_all(fh, memoryview(header))
                for mv in self._chunks(named):
                    hashed = self.hasher.submit(h.update, mv)  # hashlib and the write both release the GIL
                    _write_all(fh, mv)
                    unflushed += len(mv)
                    if unflushed >= FLUSH_BYTES and (flushed is None or flushed.done()):
                        # what is written so far goes to the disk while the rest is hashed and written: the
                        # caller's fsync at the end finds little left. On the H200 hashing (1.43 GB/s) and
                        # then fsync (1.4 GB/s) ran one after the other: 0.5 GB/s for a 1 GB shard alone.
                        if flushed is not None:
                            flushed.result()
                        flushed = self.flusher.submit(os.fdatasync, fh.fileno())
                        unflushed = 0
                    hashed.result()
            finally:
                if flushed is not None:
                    flushed.result()  # not while the file closes under it
        return h.hexdigest()

    def write_atomic(self, path: Path, named: list[tuple[str, Any]], metadata: dict[str, str] | None = None,
                     before_rename: Callable[[], None] | None = None) -> str:
        """`write` through mtpquant.core.atomic (temp, fsync, rename); the file's sha256."""
        sha: list[str] = []
        atomic_write(path, lambda tmp: sha.append(self.write(tmp, named, metadata)), before_rename)
        return sha[0]


def _wait(event: Any) -> None:
    if event is not None:
        event.synchronize()


def _write_all(fh: Any, mv: memoryview) -> None:
    while mv:
        mv = mv[fh.write(mv):]


def safetensors_order(tensors: dict[str, Any]) -> list[str]:
    """The order safetensors' own serializer lays these tensors out in (it sorts by dtype, then name), asked of
    it on one-element tensors of the same names and dtypes: a shard StreamWriter writes in this order is byte
    for byte what `save_file(tensors, metadata=...)` writes."""
    import torch
    from safetensors.torch import save

    blob = save({n: torch.zeros(1, dtype=t.dtype) for n, t in tensors.items()})
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda n: header[n]["data_offsets"][0])


def save_shard(path: Path, tensors: dict[str, Any], writer: StreamWriter, layer: int | None = None) -> str:
    """A layer's output shard, streamed from where the packed tensors are (the GPU), in safetensors' own layout;
    atomic (temp, fsync, rename; the tests' kill point before the rename); returns its sha256."""
    return writer.write_atomic(path, [(n, tensors[n]) for n in safetensors_order(tensors)], {"format": "pt"},
                               None if layer is None else lambda: kill_point("write", layer))


def save_acts(path: Path, hidden: list[Any], tops: list[Any], writer: StreamWriter) -> str:
    """The activations after a layer, streamed from where they wait (the file does not depend on where);
    atomic (temp, fsync, rename); returns its sha256."""
    return writer.write_atomic(path, _acts_entries(hidden, tops), {"format": ACTS_FORMAT, "batches": str(len(hidden))})


def load_acts(path: Path) -> tuple[list[Any], list[Any]]:
    """(hidden, topk) per batch, as save_acts wrote them, on the CPU."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != ACTS_FORMAT:
            raise MtpquantError(f"{path}: not an activations file of this engine ({meta.get('format')!r})")
        n = int(meta["batches"])
        keys = set(fh.keys())
        hidden = [fh.get_tensor(f"hidden.{b}") for b in range(n)]
        tops = [fh.get_tensor(f"topk.{b}") if f"topk.{b}" in keys else None for b in range(n)]
    return hidden, tops


def st_dtype(t: Any) -> str:
    import torch

    return {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int32: "I32",
            torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}[t.dtype]
