"""Reading a decoder layer's tensors straight from the source shards: exactly the names the index gives, into reused
(pinned) host buffers, several threads at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpquant.calib.stream.journal import sha256_bytes
from mtpquant.core.checkpoint import CHUNK, Checkpoint
from mtpquant.core.errors import MtpquantError
from mtpquant.model.families.base import LAYERS, layer_prefix


def read_tensors(source: Checkpoint, names: list[str]) -> dict[str, Any]:
    """Exactly these tensors, each read from the shard the index names (fresh tensors: the embedding, the
    rest, restored dtypes; a decoder layer's tensors go through ReadBuffers)."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = {}
    for n in names:
        by_shard.setdefault(source.weight_map[n], []).append(n)
    out = {}
    for shard, group in sorted(by_shard.items()):
        with safe_open(str(source.root / shard), "pt") as fh:
            for n in group:
                out[n] = fh.get_tensor(n)
    return out


_ALIGN = 64  # each tensor's offset in a read buffer: any dtype's view of it is aligned


def _torch_dtype(st: str) -> Any:
    import torch

    return {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "I32": torch.int32,
            "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "I16": torch.int16,
            "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[st]


READ_THREADS = 4  # threads that fill a read buffer (ReadBuffers): see its docstring for why and how many


class ReadBuffers:
    """A decoder layer's tensors read straight from the shards (offsets from the checked headers) into one of
    two host buffers that are allocated once and reused (layer i in buffer i % 2, so the reader fills the
    next layer's while this one is built); page-locked with cudaHostRegister when CUDA is there (exact size,
    not the caching host allocator's power-of-two rounding), so the host->device copies run at DMA speed.
    The tensors returned are views into the buffer: valid until the read after next (build_layer copies what
    it keeps). A buffer only grows (the first MoE layer sets its size): allocating ~3 GB per layer let the
    allocator keep the freed ones (host RSS).
    `threads` read one layer at once, each a contiguous run of the layer's bytes in file order (`os.preadv`
    releases the GIL). Inside the engine, beside the GPU thread and the writer, one thread read 0.82 GB/s and four
    0.93 GB/s on a lent H100 machine whose floor was 1.79 (alone, one thread was near the floor already); on the
    CI machine's disk, alone, 1.48 -> 1.78 GB/s (benchmarks/STREAM_H200.md, 2026-12-07)."""

    def __init__(self, source: Checkpoint, pin: bool = False, threads: int = READ_THREADS):
        self.source = source
        self.pin = pin
        self.threads = threads
        self.bufs: list[Any] = [None, None]
        self.registered: list[bool] = [False, False]
        self.reads = 0
        self.bytes_read = 0
        self.peak_bytes = 0  # for the report, which is written after close()
        self.was_pinned = False
        self.lock = threading.Lock()  # close() runs on the release thread, and at once on an error
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="stream-readpart") if threads > 1 else None

    def _buffer(self, k: int, nbytes: int) -> Any:
        import torch

        buf = self.bufs[k]
        if buf is not None and buf.numel() >= nbytes:
            return buf
        self._release(k)
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        if self.pin:
            try:
                rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
                self.registered[k] = int(rc) == 0 if not isinstance(rc, tuple) else int(rc[0]) == 0
            except Exception:  # noqa: BLE001 - pinning is an optimization: plain memory still works
                self.registered[k] = False
        self.bufs[k] = buf
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        self.was_pinned = self.was_pinned or self.registered[k]
        return buf

    def _release(self, k: int) -> None:
        import torch

        if self.bufs[k] is not None and self.registered[k]:
            torch.cuda.cudart().cudaHostUnregister(self.bufs[k].data_ptr())
        self.bufs[k], self.registered[k] = None, False

    def close(self) -> None:
        with self.lock:
            if self.pool is not None:
                self.pool.shutdown()
            for k in range(2):
                self._release(k)

    @property
    def pinned(self) -> bool:
        return any(self.registered)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.bufs if b is not None)

    def read(self, names: list[str], midway: Callable[[], None] | None = None) -> dict[str, Any]:
        """`midway`: called once about half the layer's bytes are in (the tests' kill point)."""
        infos = [self.source.tensors[n] for n in names]
        offsets, total = [], 0
        for t in infos:
            offsets.append(total)
            total += -(-t.nbytes // _ALIGN) * _ALIGN
        k = self.reads % 2
        self.reads += 1
        buf = self._buffer(k, total)
        view = memoryview(buf.numpy())
        order = sorted(range(len(infos)), key=lambda j: (str(infos[j].shard), infos[j].start))
        pieces = [(infos[j], infos[j].start + a, offsets[j] + a, min(CHUNK, infos[j].nbytes - a))
                  for j in order for a in range(0, infos[j].nbytes, CHUNK)]
        parts = _contiguous_parts(pieces, self.threads)
        progress = _Midway(sum(n for *_, n in pieces), midway)
        if self.pool is None or len(parts) < 2:
            for part in parts:
                _read_pieces(part, view, progress)
        else:
            for f in [self.pool.submit(_read_pieces, part, view, progress) for part in parts]:
                f.result()
        self.bytes_read += total
        return {t.name: buf[off:off + t.nbytes].view(_torch_dtype(t.dtype)).reshape(t.shape)
                for t, off in zip(infos, offsets, strict=True)}


def _contiguous_parts(pieces: list[tuple], n: int) -> list[list[tuple]]:
    """`pieces` (file order; bytes last) cut into at most `n` runs of about equal bytes, each in file order."""
    total = sum(p[-1] for p in pieces)
    parts: list[list[tuple]] = [[]]
    done = 0
    for p in pieces:
        if parts[-1] and len(parts) < n and done >= total * len(parts) / n:
            parts.append([])
        parts[-1].append(p)
        done += p[-1]
    return [p for p in parts if p]


class _Midway:
    """Counts the bytes read by every part; calls `fn` once when half are in."""

    def __init__(self, total: int, fn: Callable[[], None] | None):
        self.half, self.fn, self.done, self.lock = total / 2, fn, 0, threading.Lock()

    def add(self, n: int) -> None:
        if self.fn is None:
            return
        with self.lock:
            self.done += n
            if self.done < self.half or self.fn is None:
                return
            fn, self.fn = self.fn, None
        fn()


def _read_pieces(pieces: list[tuple], view: memoryview, progress: _Midway) -> None:
    """Each (tensor, file offset, buffer offset, bytes) read into `view`, one file descriptor per shard."""
    fds: dict[Path, int] = {}
    try:
        for t, pos, off, n in pieces:
            fd = fds.get(t.shard)
            if fd is None:
                fd = fds[t.shard] = os.open(t.shard, os.O_RDONLY)
            done = 0
            while done < n:
                got = os.preadv(fd, [view[off + done:off + n]], pos + done)
                if not got:
                    raise MtpquantError(f"{t.shard}: tensor {t.name}: truncated at byte {pos + done}")
                done += got
            progress.add(n)
    finally:
        for fd in fds.values():
            os.close(fd)


def layer_names(source: Checkpoint, i: int) -> list[str]:
    prefix = layer_prefix(i)
    return sorted(n for n in source.weight_map if n.startswith(prefix))


@dataclass
class ReadLog:
    """The source tensors this process read (by name), for the report: under torchrun each rank's read set is
    its own layers' tensors (plus the embedding every rank embeds with; rank 0 also the tensors outside the
    decoder layers), never the model."""

    names: set[str] = field(default_factory=set)

    def record(self, names: list[str]) -> list[str]:
        self.names.update(names)
        return names

    def summary(self, source: Checkpoint) -> dict[str, Any]:
        names = sorted(self.names)
        layers = sorted({int(n[len(LAYERS):].split(".", 1)[0]) for n in names if n.startswith(LAYERS)})
        return {"tensors": len(names), "bytes": sum(source.tensors[n].nbytes for n in names),
                "names_sha256": names_sha256(names), "layers": layers,
                "outside_layers": [n for n in names if not n.startswith(LAYERS)]}


def names_sha256(names: list[str]) -> str:
    """sha256 of the sorted names, one a line (how ReadLog summarizes a read set)."""
    return sha256_bytes("\n".join(sorted(names)).encode())
