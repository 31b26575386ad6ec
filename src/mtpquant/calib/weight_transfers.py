"""Overlap the sequential pipeline's weight copies with its compute (`fast_experts.overlap_weights`).

compressed-tensors keeps every module's tensors in a CPU copy (`CPUCache`). The sequential pipeline
onloads a decoder layer's weights when its subgraph first touches them, and every quantized weight GPTQ
produces is written back to the CPU copy at once; both are host-blocking copies of pageable memory. In
run B (CALIB_SPEED.md, E = 64) they were ~4 s of the fast path's 11.2 s MoE subgraph, with the GPU idle.

`WeightTransfers` moves the same bytes at other times, on one worker thread with its own CUDA stream:

- prefetch: `prefetch(layer)` queues a copy of every offloaded tensor of `layer` to its onload device;
  `CPUCache.onload` then hands out the prefetched copy (the current stream waits for its copy event)
  instead of copying again. The modifier asks for layer i+1 when layer i first runs in its calibration
  pass, if the GPU has room.
- write-back: `CPUCache.update_offload` of a tensor from another device is queued instead of done at once
  (the onloaded copy, which the propagation pass reads, is still updated at once by compressed-tensors).
  An onload of a tensor with a queued write waits for it; a write drops a stale prefetched copy; `drain()`
  waits for every queued write (the modifier drains before each solve and at calibration end, so the
  saved checkpoint sees every write).

The queue is FIFO: a layer's write-backs finish, and free their GPU sources, before a prefetch queued
after them allocates. Under torchrun (`DistributedCPUCache`: shared memory that other ranks read) writes
stay synchronous; prefetch only reads.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from compressed_tensors.offload.cache.cpu import CPUCache

PREFETCH_FRACTION = 0.5  # prefetch a layer when it takes at most this share of the GPU memory still free


class WeightTransfers:
    def __init__(self, force: bool = False) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtpquant-weights")
        self._stream: dict[torch.device, Any] = {}
        self._prefetched: dict[int, tuple[torch.Tensor, Future[Any]]] = {}  # id(offloaded) -> (offloaded, copy)
        self._writes: dict[int, tuple[torch.Tensor, list[Future[Any]]]] = {}
        self._orig: dict[str, Any] = {}
        self._force = force  # tests: prefetch and queue CPU-to-CPU copies too
        self.stats = {"prefetched_gb": 0.0, "prefetch_hits": 0, "prefetch_skipped_gb": 0.0, "prefetch_failed": 0,
                      "prefetch_wait_s": 0.0, "written_back_gb": 0.0, "writeback_wait_s": 0.0}

    # ---- install / remove ---------------------------------------------------------------------------

    def __enter__(self) -> WeightTransfers:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def install(self) -> None:
        if self._orig:
            return
        self._orig = {"onload": CPUCache.__dict__["onload"], "update_offload": CPUCache.__dict__["update_offload"]}
        me = self

        def onload(cache: CPUCache, offloaded: torch.Tensor | None) -> torch.Tensor | None:
            return me._onload(cache, offloaded)

        def update_offload(cache: CPUCache, offloaded: torch.Tensor, data: torch.Tensor | None) -> None:
            me._update_offload(cache, offloaded, data)

        CPUCache.onload = onload  # type: ignore[method-assign]
        CPUCache.update_offload = update_offload  # type: ignore[method-assign]

    def close(self) -> None:
        """Wait for every queued write, drop unused prefetched copies, put CPUCache back."""
        self.drain()
        for _, fut in self._prefetched.values():
            fut.exception()  # wait; an unused copy's failure does not matter
        self._prefetched.clear()
        if self._orig:
            CPUCache.onload = self._orig["onload"]  # type: ignore[method-assign]
            CPUCache.update_offload = self._orig["update_offload"]  # type: ignore[method-assign]
            self._orig = {}
        self._pool.shutdown(wait=True)

    # ---- prefetch -----------------------------------------------------------------------------------

    @staticmethod
    def offloaded_tensors(module: torch.nn.Module) -> list[tuple[CPUCache, torch.Tensor]]:
        out = []
        for m in module.modules():
            for cache in (m._parameters, m._buffers):
                if isinstance(cache, CPUCache):
                    out += [(cache, t) for t in cache.offloaded_values.values() if t is not None]
        return out

    def prefetch(self, module: torch.nn.Module) -> bool:
        """Queue copies of `module`'s offloaded tensors to their onload device, if there is room there."""
        items = [(c, t) for c, t in self.offloaded_tensors(module)
                 if id(t) not in self._prefetched and (self._force or torch.device(c.onload_device) != t.device)]
        if not items:
            return False
        nbytes = sum(t.numel() * t.element_size() for _, t in items)
        device = torch.device(items[0][0].onload_device)
        if not self._room(device, nbytes):
            self.stats["prefetch_skipped_gb"] += nbytes / 1e9
            return False
        for cache, t in items:
            self._prefetched[id(t)] = (t, self._pool.submit(self._copy_in, cache, t))
        self.stats["prefetched_gb"] += nbytes / 1e9
        return True

    @staticmethod
    def _room(device: torch.device, nbytes: int) -> bool:
        if device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return nbytes <= PREFETCH_FRACTION * (free + cached)

    def _side_stream(self, device: torch.device) -> Any:
        if device not in self._stream:
            self._stream[device] = torch.cuda.Stream(device)
        return self._stream[device]

    def _copy_in(self, cache: CPUCache, offloaded: torch.Tensor) -> tuple[torch.Tensor, Any]:
        device = torch.device(cache.onload_device)
        if device.type != "cuda":
            return self._orig["onload"](cache, offloaded), None
        stream = self._side_stream(device)
        with torch.cuda.stream(stream):
            out = self._orig["onload"](cache, offloaded)
            event = torch.cuda.Event()
            event.record(stream)
        return out, event

    def _take(self, offloaded: torch.Tensor) -> torch.Tensor | None:
        entry = self._prefetched.pop(id(offloaded), None)
        if entry is None:
            return None
        t0 = time.perf_counter()
        try:
            out, event = entry[1].result()
        except RuntimeError:  # e.g. the GPU ran out of memory meanwhile: copy as compressed-tensors would
            self.stats["prefetch_failed"] += 1
            return None
        finally:
            self.stats["prefetch_wait_s"] += time.perf_counter() - t0
        if event is not None:
            current = torch.cuda.current_stream(out.device)
            current.wait_event(event)
            out.record_stream(current)  # allocated on the side stream, used and freed on this one
        self.stats["prefetch_hits"] += 1
        return out

    def _onload(self, cache: CPUCache, offloaded: torch.Tensor | None) -> torch.Tensor | None:
        if offloaded is None:
            return None
        self._wait_writes(offloaded)
        got = self._take(offloaded)
        return got if got is not None else self._orig["onload"](cache, offloaded)

    # ---- write-back ---------------------------------------------------------------------------------

    def _update_offload(self, cache: CPUCache, offloaded: torch.Tensor, data: torch.Tensor | None) -> None:
        if data is None:
            return
        stale = self._prefetched.pop(id(offloaded), None)  # the prefetched copy predates this write
        if stale is not None:
            stale[1].exception()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed or not (data.device != offloaded.device or self._force):
            self._wait_writes(offloaded)
            self._orig["update_offload"](cache, offloaded, data)
            return
        event = None
        if data.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(data.device))
        fut = self._pool.submit(self._copy_out, cache, offloaded, data, event)
        self._writes.setdefault(id(offloaded), (offloaded, []))[1].append(fut)
        self.stats["written_back_gb"] += data.numel() * data.element_size() / 1e9

    def _copy_out(self, cache: CPUCache, offloaded: torch.Tensor, data: torch.Tensor, event: Any) -> None:
        if event is None:
            self._orig["update_offload"](cache, offloaded, data)
            return
        stream = self._side_stream(data.device)
        with torch.cuda.stream(stream):
            stream.wait_event(event)
            self._orig["update_offload"](cache, offloaded, data)  # pageable destination: returns when copied
            stream.synchronize()

    def _wait_writes(self, offloaded: torch.Tensor) -> None:
        entry = self._writes.pop(id(offloaded), None)
        if entry is not None:
            for fut in entry[1]:
                fut.result()

    def drain(self) -> None:
        """Wait for every queued write-back (re-raises a failed one)."""
        t0 = time.perf_counter()
        while self._writes:
            _, (_, futs) = self._writes.popitem()
            for fut in futs:
                fut.result()
        self.stats["writeback_wait_s"] += time.perf_counter() - t0


@contextlib.contextmanager
def overlapped(enabled: bool) -> Any:
    """A WeightTransfers installed for the block (None when not enabled)."""
    if not enabled:
        yield None
        return
    with WeightTransfers() as wt:
        yield wt
