"""`quantize --engine stream`: GPTQ one decoder layer at a time, straight from the source shards, resumable.

The memory engine (mtpquant.calib.quantize) loads the whole BF16 model and hands it to `oneshot`. This engine never
holds more than one decoder layer with real weights:

1. The model skeleton is built on the meta device from config.json; only the embedding (read alone from its
   shard) and the rotary tables get real values. The model's own forward runs up to layer 0, where a catcher
   records what it passes to every decoder layer (hidden states, mask, position embeddings) per batch.
2. For each decoder layer in order: exactly that layer's tensors are read from the shards the index names
   (`safetensors.safe_open`), the layer is built with them and its experts linearized (llm-compressor's
   classes), and the project's modifier (`quantize.modifier_for`: llm-compressor's GPTQModifier or
   ExpertGPTQModifier) runs its lifecycle on it as llm-compressor's SequentialPipeline does for one subgraph:
   a calibration pass with the hooks on, `sequential_epoch_end` (the solve), a propagation pass through the
   quantized layer with the hooks off, under `calibration_forward_context` and `DisableQuantization`.
   The batches are llm-compressor's own (`format_calibration_data`: its sampler and collator).
   compressed-tensors' `ModelCompressor` packs the layer; its shard is written to a temp file and renamed.
3. The embedding, final norm and lm_head are copied from the source; config.json gets `quantization_config`
   from compressed-tensors' own code (`ModelCompressor.update_config` of a meta model carrying the schemes).

Resume: `<out>.work/journal.json` records per finished layer its shard and sha256 and the activations saved
at that boundary (file and sha256), under a fingerprint of every input. A layer counts as finished only once
its journal entry is written (after its shard and activations were renamed into place) and its files still
hash as recorded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpquant.calib.quantize import (
    activation_bytes,
    activation_device,
    checked_inputs,
    few_token_experts,
    modifier_for,
    oneshot_options,
    recording_gptq,
    routing_counts,
)
from mtpquant.core.atomic import atomic_dir, atomic_write, atomic_write_json
from mtpquant.core.checkpoint import CHUNK, INDEX_NAME, Checkpoint, file_sha256, safetensors_header_bytes
from mtpquant.core.errors import MtpquantError
from mtpquant.core.measure import host_rss_gib, peak_memory
from mtpquant.model import recipes
from mtpquant.model.families.base import LAYERS, layer_prefix
from mtpquant.model.recipes import QuantRecipe

ENGINE_VERSION = "stream-4"  # 2: deterministic algorithms on the GPU (outputs there changed); 3: activations
# files in safetensors layout (streamed, not torch.save), none after the last layer (the artifact is unchanged);
# 4: layer 0's inputs come from a forward on the GPU (rotary tables computed there: outputs there may change;
# on the H200 benchmark checkpoint every file's sha256 stayed that of stream-3)
JOURNAL = "journal.json"
EMBED_NAME = "model.embed_tokens.weight"  # read first, while the calibration data is tokenized
PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "safetensors")


def work_dir_for(out_dir: Path) -> Path:
    return Path(out_dir).with_name(Path(out_dir).name + ".work")


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(source: Checkpoint, qpath: Path, cpath: Path, token_ids_sha256: str) -> dict[str, str]:
    """Everything the output depends on; a resume is refused when any of it changed."""
    from importlib.metadata import version

    index = source.index_path if source.index_path.exists() else source.root / "model.safetensors"
    fp = {
        "source_index": file_sha256(index) if index.name == INDEX_NAME else
        _sha256_bytes(json.dumps(source.index, sort_keys=True).encode()),
        "source_config": file_sha256(source.root / "config.json"),
        "recipe": recipes.recipe_sha256("quant", qpath),
        "calibration": recipes.recipe_sha256("calibration", cpath),
        "token_ids": token_ids_sha256,
        "engine": ENGINE_VERSION,
    }
    for pkg in PACKAGES:
        fp[f"version:{pkg}"] = version(pkg)
    return fp


class Journal:
    """`journal.json` in the work dir: the fingerprint and the finished layers, rewritten atomically."""

    def __init__(self, work: Path, fp: dict[str, str], restart: bool):
        self.work = work
        self.discard: Callable[[Path], Any] = Journal.unlink  # how a no longer needed boundary is deleted
        self.path = work / JOURNAL
        if restart and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        self.layers: list[dict[str, Any]] = []
        if self.path.exists():
            old = json.loads(self.path.read_text())
            changed = [k for k in sorted(set(fp) | set(old["fingerprint"]))
                       if fp.get(k) != old["fingerprint"].get(k)]
            if changed:
                raise MtpquantError(
                    f"quantize --engine stream: cannot resume {work}: {', '.join(changed)} changed since it "
                    "started; re-run with --restart to start over")
            for entry in old["layers"]:  # a layer whose shard is gone or differs is not finished
                if not _intact(work, entry["shard"], entry["shard_sha256"]):
                    break
                self.layers.append(entry)
            # resuming needs the activations after the last finished layer (earlier ones are deleted as the
            # run goes): without them intact, back off to an earlier boundary, down to a fresh start
            # (the model's last layer has none: nothing comes after it)
            while self.layers and self.layers[-1]["activations"] is not None and not _intact(
                    work, self.layers[-1]["activations"], self.layers[-1]["activations_sha256"]):
                self.layers.pop()
        self.fp = fp
        self._write()

    @staticmethod
    def unlink(path: Path) -> None:
        path.unlink(missing_ok=True)

    def _write(self) -> None:
        atomic_write_json(self.path, {"engine": ENGINE_VERSION, "fingerprint": self.fp, "layers": self.layers})

    def finish(self, entry: dict[str, Any]) -> None:
        self.layers.append(entry)
        self._write()
        _kill_point("after", entry["layer"])

    def absorb(self) -> int:
        """Journals, in layer order, each layer whose owner rank has written its entry file (which it does only
        once the layer's shard and activations are durable); stops at the first layer not there yet. The
        activations of the layer before are then no longer needed to resume. Rank 0 alone calls this."""
        added = 0
        while (path := self.work / entry_name(len(self.layers))).is_file():
            prev = self.layers[-1]["activations"] if self.layers else None
            self.finish(json.loads(path.read_text()))
            if prev:
                self.discard(self.work / prev)
            added += 1
        return added

    def drop_stale_entries(self) -> None:
        """Entry files past the journal (left by a killed run) are not taken: those layers run again. Boundaries
        other than the one resume reads are deleted: the old ones' unlinks run on a release thread, so a
        process killed right after a journal entry can leave one behind (GBs each)."""
        for path in self.work.glob("layer-*.json"):
            if int(path.stem.removeprefix("layer-")) >= len(self.layers):
                path.unlink()
        keep = self.layers[-1]["activations"] if self.layers else None
        for path in self.work.glob("activations-after-*.safetensors"):
            if path.name != keep:
                path.unlink()


def entry_name(i: int) -> str:
    """Layer i's entry file in the work dir, written by its owner rank after its files are durable."""
    return f"layer-{i:05d}.json"


def _journal_layers(path: Path) -> int | None:
    return len(json.loads(path.read_text())["layers"]) if path.is_file() else None


def open_journal(work: Path, fp: dict[str, str], restart: bool, split: Any) -> tuple[Journal | None, int]:
    """Rank 0 opens the journal (refusing changed inputs, as one process does); then every rank checks that it
    has the inputs rank 0 has and sees the journal rank 0 wrote, else every rank refuses with the same line
    (a rank that refused alone would leave the others waiting). Returns (the journal on rank 0, else None;
    the first layer to run)."""
    from mtpquant.calib import ranks

    journal, status = None, {}
    if split.rank == 0:
        try:
            journal = Journal(work, fp, restart)
            journal.drop_stale_entries()
            status = {"start": len(journal.layers)}
        except MtpquantError as e:
            status = {"error": str(e)}
    status = ranks.share(status, ranks.control())
    if "error" in status:
        raise MtpquantError(status["error"])
    start = status["start"]
    views = ranks.gather({"fingerprint": fp, "journal_layers": _journal_layers(work / JOURNAL)}, ranks.control())
    first = views[0]["fingerprint"]
    for r, view in enumerate(views):
        changed = sorted(k for k in set(first) | set(view["fingerprint"]) if view["fingerprint"].get(k) != first.get(k))
        if changed:
            raise MtpquantError(f"quantize --engine stream: rank {r}'s inputs differ from rank 0's "
                                f"({', '.join(changed)}): every rank must run the same command on the same files")
        if view["journal_layers"] != start:
            seen = "no journal" if view["journal_layers"] is None else f"{view['journal_layers']} finished layers"
            raise MtpquantError(f"quantize --engine stream: rank {r} sees {seen} in {work / JOURNAL}, rank 0 sees "
                                f"{start}: every rank must see one work dir (on several nodes, a shared filesystem)")
    return journal, start


def _intact(work: Path, name: str, sha256: str) -> bool:
    return (work / name).is_file() and file_sha256(work / name) == sha256


def _kill_point(phase: str, layer: int) -> None:
    """Tests: MTPQUANT_STREAM_KILL=PHASE:LAYER SIGKILLs this process there ("read": half of the layer's bytes
    read; "calibrate": half of the calibration batches through the layer with the Hessian hooks on (a dense
    layer: before its propagation pass); "write": layer's shard written to its temp file, not yet renamed;
    "after": right after the layer's journal entry)."""
    if os.environ.get("MTPQUANT_STREAM_KILL") == f"{phase}:{layer}":
        os.kill(os.getpid(), 9)


@dataclass(frozen=True)
class Placement:
    """Where activations wait between layers: the GPU when the recipe's `fast_experts.activations` says so
    (quantize.activation_device, the memory engine's rule), else host memory, pinned when CUDA is there (the
    host<->device copies of both passes run from page-locked memory)."""

    device: str = "cpu"
    pin: bool = False

    def put(self, obj: Any) -> Any:
        """Tensors in `obj` (nested tuples, lists, dicts) moved to where activations wait."""
        if self.device != "cpu" or not self.pin:
            return _to(obj, self.device)
        return _map_tensors(obj, _pinned_copy)


def placement(recipe: QuantRecipe, cache_bytes: int, gpu: tuple[str, int] | None = None,
              cuda: bool | None = None) -> Placement:
    """`cache_bytes`: what the activations take at a layer boundary (the stream engine holds a layer's inputs
    and outputs at once). `gpu`, `cuda`: as quantize.activation_device, for tests (None asks torch)."""
    import torch

    device = activation_device(recipe, cache_bytes, gpu)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return Placement(device, pin=device == "cpu" and cuda)


def _pinned_copy(t: Any) -> Any:
    import torch

    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[dict[str, Any]]:
    """What makes a GPU run reproduce itself bit for bit (and a resumed run its uninterrupted twin): torch's
    deterministic algorithms (the routed forward's `index_add_` over duplicate token indices, mtpquant.
    expert_gptq and transformers' MoE, otherwise accumulates bf16 with float atomics in a varying order, so a
    MoE layer's outputs, and every layer after it, change run to run), cuBLAS with a fixed workspace
    (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts), no TF32 for FP32 matmuls (torch's default, kept).
    `warn_only`: an op without a deterministic kernel warns instead of failing the run. Uninitialized memory
    is not filled with NaN (the mode's default: it would cost a pass over every `torch.empty`, e.g. the
    pinned activation buffers, and the engine overwrites what it allocates). Off on the CPU (its
    kernels are deterministic; the engines' bit-equality there stays as it was). Restores what it changed."""
    import torch

    settings = {"enabled": enabled}
    if not enabled:
        yield settings
        return
    import torch.utils.deterministic as det

    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           det.fill_uninitialized_memory)
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = False
    settings.update(deterministic_algorithms="warn_only", cublas_workspace_config=os.environ["CUBLAS_WORKSPACE_CONFIG"],
                    allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    try:
        yield settings
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        det.fill_uninitialized_memory = was[2]
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


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
    releases the GIL): one thread reading 16 MiB at a time reached about half the disk's sequential floor on the
    H200 (0.93 vs 1.77 GB/s), with the GPU thread and the writer beside it."""

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


_EXPERT = r"^(.*mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$"


def split_experts(tensors: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, dict[tuple[int, str], Any]]]:
    """A layer's tensors by name relative to `prefix`: (the others, {experts base: {(expert, gate|up|down): t}})."""
    import re

    pat = re.compile(_EXPERT)
    others: dict[str, Any] = {}
    experts: dict[str, dict[tuple[int, str], Any]] = {}
    for name, t in tensors.items():
        rel = name.removeprefix(prefix)
        m = pat.match(rel)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        else:
            others[rel] = t
    return others, experts


def fuse_experts(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    """On-disk per-expert 2-D tensors -> the fused 3-D parameters the transformers module holds (the inverse
    of fixture.unfuse_experts, as transformers' load conversion does). Names relative to the layer."""
    import torch

    out, experts = split_experts(tensors, prefix)
    for base, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        out[f"{base}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]])
                                                   for e in range(n)])
        out[f"{base}.down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    return out


def layer_state(tensors: dict[str, Any], prefix: str, device: Any, dtypes: dict[str, Any]) -> dict[str, Any]:
    """fuse_experts + the move to `device` with the module's dtypes, in one pass that writes each value once
    into a fresh tensor on `device` (the fused experts preallocated there, filled expert by expert): no fused
    host copy of the layer, nothing left pointing into the read buffer. `dtypes`: the module's state dict
    dtypes by relative name. Values equal fuse_experts(...) then .to(device, dtype) (copies and the same
    dtype conversion)."""
    import torch

    out, experts = split_experts(tensors, prefix)
    for rel, t in out.items():  # not in the module (not in dtypes): left as read, build_layer names it
        if rel in dtypes:
            out[rel] = torch.empty(t.shape, dtype=dtypes[rel], device=device).copy_(t)
    for base, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        g, d = parts[(0, "gate")], parts[(0, "down")]
        gu_name, down_name = f"{base}.gate_up_proj", f"{base}.down_proj"
        gu = torch.empty((n, 2 * g.shape[0], g.shape[1]), dtype=dtypes.get(gu_name, g.dtype), device=device)
        down = torch.empty((n, *d.shape), dtype=dtypes.get(down_name, d.dtype), device=device)
        for e in range(n):
            gu[e, :g.shape[0]].copy_(parts[(e, "gate")])
            gu[e, g.shape[0]:].copy_(parts[(e, "up")])
            down[e].copy_(parts[(e, "down")])
        out[gu_name], out[down_name] = gu, down
    return out


def build_layer(skeleton: Any, i: int, source: Checkpoint, device: Any, tensors: dict[str, Any] | None = None) -> Any:
    """Decoder layer i with its real weights on `device` (dtypes as the skeleton's, as from_pretrained gives
    them), experts linearized with llm-compressor's classes. `tensors`: the layer's tensors already read
    (the prefetcher's, possibly views into a ReadBuffers buffer: every value is copied); read here when not
    given."""
    import copy

    import torch
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes

    meta_layer = skeleton.model.layers[i]
    prefix = layer_prefix(i)
    if tensors is None:
        tensors = read_tensors(source, layer_names(source, i))
    expected = meta_layer.state_dict()
    state = layer_state(tensors, prefix, device, {k: v.dtype for k, v in expected.items()})
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise MtpquantError(f"{source.root}: layer {i}: tensors do not match the model "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
    layer = copy.deepcopy(meta_layer, {id(skeleton.config): skeleton.config})  # one config: contexts that
    # switch the attention implementation (llm-compressor's eager attention) must reach the layer too
    layer.load_state_dict(state, assign=True, strict=True)
    for name, mod in get_non_linearized_moes(layer):
        cls = LinearExperts2D.get_linear_experts_cls(mod.__class__)
        # the new Linears are created on `device`: by default they are host tensors, so the experts went to the
        # host and back (two pageable copies of the layer: 14-16 s of a 43-52 s GLM-5.2 MoE layer on the H200)
        with torch.device(device):
            layer.set_submodule(name, cls.from_experts_module(mod, getattr(mod, "config", skeleton.config)))
    left = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
    if left:
        raise MtpquantError(f"layer {i}: tensors still on the meta device after loading: {left[:3]}")
    return layer


def meta_skeleton(cls: Any, config: Any) -> Any:
    import torch

    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.bfloat16)
    model.eval()
    return model


class _Caught(Exception):
    pass


@functools.cache
def _catcher_class() -> type:
    """A module that stands in for decoder layer 0: it keeps what reaches it in `self.caught` and stops the
    forward. What is caught lives on the instance, never in a closure: a class sits in a reference cycle (every
    class does), so a list its method closed over lived until the cyclic GC ran, and with it layer 0's inputs
    (on the GPU: one extra set of hidden states at the peak, +4.5 GiB on the H200)."""
    import torch

    class Catcher(torch.nn.Module):
        def __init__(self, put: Callable[[Any], Any]) -> None:
            super().__init__()
            self.put = put
            self.caught: list[tuple[Any, dict[str, Any]]] = []

        def forward(self, hidden_states: Any, **kwargs: Any) -> Any:
            self.caught.append((self.put(hidden_states), kwargs))
            raise _Caught

    return Catcher


EMBED_GROUP = 32  # calibration batches embedded in one forward of the model's prefix (layer_inputs)


def embed_groups(batches: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Runs of at most `size` consecutive batches that one forward can take at once: the same keys, tensor
    shapes and other values."""
    import torch

    def key(b: dict[str, Any]) -> tuple:
        return tuple((n, ("t", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("v", repr(v)))
                     for n, v in sorted(b.items()))

    groups: list[list[dict[str, Any]]] = []
    for b in batches:
        if groups and len(groups[-1]) < size and key(groups[-1][-1]) == key(b):
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _split_caught(hidden: Any, kwargs: dict[str, Any], sizes: list[int]) -> list[tuple[Any, dict[str, Any]]]:
    """One group's forward, as the forwards of its batches: every tensor whose first dimension is the group's
    rows is split by batch (views), the others (built once for all rows: rotary tables) are shared."""
    rows, n = sum(sizes), len(sizes)
    # each tensor split once (a view per batch), or the tensor itself for every batch
    parts = _map_tensors(kwargs, lambda t: _PerBatch(t.split(sizes) if t.dim() and t.shape[0] == rows else (t,) * n))
    return [(h, _pick(parts, j)) for j, h in enumerate(hidden.split(sizes))]


class _PerBatch:
    """One tensor of a group's forward as each batch gets it (_split_caught)."""

    def __init__(self, views: tuple[Any, ...]):
        self.views = views


def _pick(obj: Any, j: int) -> Any:
    """Batch j's value of `obj`, where _split_caught put a _PerBatch in place of every tensor."""
    return _map_tensors(obj, lambda p: p.views[j], leaf=_PerBatch)


def _same(a: Any, b: Any) -> bool:
    """Nested tuples, lists, dicts of tensors and values: equal, tensors bit for bit (shape, dtype, values)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def layer_inputs(skeleton: Any, config: Any, source: Checkpoint, batches: list[dict[str, Any]],
                 put: Callable[[Any], Any] = lambda t: t, spans: dict[str, float] | None = None,
                 embedding: Future | None = None, device: Any = "cpu",
                 group: int = EMBED_GROUP) -> tuple[list[Any], list[dict[str, Any]]]:
    """Per batch: (hidden states entering layer 0, the other arguments the model passes every decoder layer),
    from the model's own forward on `device` with a real embedding and rotary table and a catcher at layer 0.
    `put(hidden)` is what is kept of each batch's hidden states, as it is caught. `spans`: the read's (or the
    wait for `embedding`, a read_tensors already running) and the forward's seconds, and how many forwards.
    Why the GPU when there is one, and `group` batches per forward: on the H200 the CPU forward of one batch
    at a time took 2.2-2.3 s for 768 batches (the bf16 gather, the masks, a pageable copy each), on the GPU
    still 1.75 s (the model's Python per call), all of it before layer 0 can start. A group's forward is
    checked once against its first batch's own forward, bit for bit, and if it differs (a model whose prefix
    mixes the rows) every batch runs alone."""
    import torch
    from llmcompressor.utils.helpers import calibration_forward_context

    span = _Spans(spans)
    inner = skeleton.model
    read = embedding.result() if embedding is not None else read_tensors(source, [EMBED_NAME])
    emb = read[EMBED_NAME]
    del read
    span("embedding_read")
    embed = torch.nn.Embedding(emb.shape[0], emb.shape[1], padding_idx=inner.embed_tokens.padding_idx,
                               dtype=inner.embed_tokens.weight.dtype, device=device)
    embed.load_state_dict({"weight": emb.to(embed.weight.dtype)})
    del emb
    rotary = type(inner.rotary_emb)(config=config).to(device)
    first = inner.layers[0]
    catcher = _catcher_class()(lambda t: t)
    saved = (inner.embed_tokens, inner.rotary_emb)
    inner.embed_tokens, inner.rotary_emb, inner.layers[0] = embed, rotary, catcher

    def forward(g: list[dict[str, Any]]) -> list[tuple[Any, dict[str, Any]]]:
        import torch

        b = g[0] if len(g) == 1 else {k: torch.cat([x[k] for x in g]) if isinstance(v, torch.Tensor) else v
                                      for k, v in g[0].items()}
        with contextlib.suppress(_Caught):
            inner(**_to(b, device))
        (hidden, kwargs), = catcher.caught
        catcher.caught = []
        if len(g) == 1:
            return [(hidden, kwargs)]
        return _split_caught(hidden, kwargs, [next(v for v in x.values() if isinstance(v, torch.Tensor)).shape[0]
                                              for x in g])

    out: list[tuple[Any, dict[str, Any]]] = []
    try:
        with calibration_forward_context(skeleton):
            groups = embed_groups(batches, group)
            done = forward(groups[0]) if groups else []  # group 0, checked against its first batch alone
            if len(done) > 1 and not _same(forward(groups[0][:1])[0], done[0]):
                groups = [[b] for b in batches]
                done = forward(groups[0])
            out += [(put(h), kw) for h, kw in done]
            del done
            for g in groups[1:]:
                out += [(put(h), kw) for h, kw in forward(g)]
    finally:
        (inner.embed_tokens, inner.rotary_emb), inner.layers[0] = saved, first
    span("embedding_forward")
    if spans is not None:
        spans["embedding_forwards"] = len(groups)  # a count, not seconds: len(batches) when grouping fell back
    return [h for h, _ in out], [kw for _, kw in out]


def _split_output(out: Any) -> tuple[Any, Any]:
    """(hidden states, what the next layer gets as prev_topk_indices): GLM-5's layers return both."""
    if isinstance(out, tuple):
        return out[0], out[1] if len(out) > 1 else None
    return out, None


def _map_tensors(obj: Any, fn: Callable[[Any], Any], leaf: type | None = None) -> Any:
    """`fn` applied to every tensor (or every instance of `leaf`) in (nested tuples, lists, dicts of) `obj`."""
    if leaf is None:
        import torch

        leaf = torch.Tensor
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, fn, leaf) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, leaf) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: Any) -> Any:
    """Tensors in (nested tuples, lists, dicts of) `obj` moved to `device` (the same objects where they are)."""
    return _map_tensors(obj, lambda t: t.to(device))


def _call(layer: Any, hidden: Any, kwargs: dict[str, Any], prev: Any, device: Any, place: Placement) -> Any:
    """The layer on its execution device; what it returns goes where activations wait between layers (on a
    CPU-only machine every move is a no-op)."""
    if "prev_topk_indices" in kwargs:
        kwargs = {**kwargs, "prev_topk_indices": prev}
    return place.put(layer(_to(hidden, device), **_to(kwargs, device)))


def _propagate(layer: Any, hidden: list[Any], kwargs: list[dict[str, Any]], prev: list[Any], device: Any,
               place: Placement) -> tuple[list[Any], list[Any]]:
    """The propagation pass: each batch's (hidden out, topk out). Each batch's inputs are dropped from `hidden`
    and `prev` as its output is made, as llm-compressor's pipeline deletes what a subgraph consumed: on the GPU
    the layer's inputs and outputs are never both held whole (+1 set of activations, 4.5 GiB at GLM-5.2's
    393K tokens). Whoever still needs the inputs (the writer of the boundary before) holds its own list."""
    outs: list[Any] = []
    tops: list[Any] = []
    for b in range(len(hidden)):
        h, t = _split_output(_call(layer, hidden[b], kwargs[b], prev[b], device, place))
        hidden[b] = prev[b] = None
        outs.append(h)
        tops.append(t)
    return outs, tops


def calibrate_layer(skeleton: Any, i: int, layer: Any, recipe: QuantRecipe, targets: list[str],
                    hidden: list[Any], prev: list[Any], kwargs: list[dict[str, Any]], fam: Any,
                    config_dict: dict[str, Any], device: Any, place: Placement = Placement(),
                    share: tuple[int, int] | None = None, spans: dict[str, float] | None = None,
                    gpu: dict[str, float] | None = None) -> tuple[list[Any], list[Any], list[Any], Any, dict]:
    """One subgraph of llm-compressor's SequentialPipeline for decoder layer i: calibration pass, solve,
    propagation pass through the quantized layer. `share`: (rank, world) of the expert split; `spans` gets
    each phase's seconds (the GPU synchronized at its end), `gpu` the GPU's peak GiB so far at its end.
    Returns (hidden out, topk out, the GPTQ rows this process solved, routing counts, modifier fields the solve
    resolved)."""
    span = _Spans(spans, device, gpu)
    from llmcompressor.core import LifecycleCallbacks, active_session
    from llmcompressor.modeling.moe.context import moe_calibration_context
    from llmcompressor.modeling.offset_norm import norm_calibration_context
    from llmcompressor.modifiers.utils.hooks import HooksMixin
    from llmcompressor.utils.helpers import DisableQuantization, calibration_forward_context

    skeleton.model.layers[i] = layer
    if not any(n.startswith(layer_prefix(i)) for n in fam.routed_expert_linears(config_dict)):
        # nothing to quantize here (a dense layer): the pipeline's two passes give the same outputs
        _kill_point("calibrate", i)
        with calibration_forward_context(skeleton):
            outs, tops = _propagate(layer, hidden, kwargs, prev, device, place)
        span("propagation_pass")
        return outs, tops, [], None, {}
    opts = oneshot_options(recipe)
    modifier = modifier_for(recipe, targets)
    if share is not None:
        modifier.expert_share = share
    session = active_session()
    session.reset()
    with contextlib.ExitStack() as stack:
        stack.enter_context(norm_calibration_context(skeleton))
        if opts["moe_calibrate_all_experts"]:
            stack.enter_context(moe_calibration_context())
        rec = stack.enter_context(recording_gptq(skeleton))
        counts = stack.enter_context(routing_counts(skeleton, fam, config_dict))
        session.initialize(model=skeleton, start=-1, recipe=modifier, sequential_targets=opts["sequential_targets"])
        LifecycleCallbacks.calibration_start()
        with calibration_forward_context(skeleton), DisableQuantization(skeleton):
            for b in range(len(hidden)):
                if b == len(hidden) // 2:
                    _kill_point("calibrate", i)
                session.state.current_batch_idx = b
                _call(layer, hidden[b], kwargs[b], prev[b], device, place)
            span("calibration_pass")  # the forward with the Hessian hooks (the all-experts pass)
            LifecycleCallbacks.sequential_epoch_end(list(layer.modules()))
            span("solve")  # and, under the expert split, the owners' broadcast
            with HooksMixin.disable_hooks():
                outs, tops = _propagate(layer, hidden, kwargs, prev, device, place)
            span("propagation_pass")
        LifecycleCallbacks.calibration_end()
    session.finalize()
    layer_state = {"batched_quantization": getattr(modifier, "batched_quantization", None)}
    return outs, tops, rec.rows, counts.get(i), layer_state


class _Spans:
    """Seconds since the previous call, by name, into `out` (nothing when it is None); a GPU is synchronized
    first, so a phase's kernels count in that phase."""

    def __init__(self, out: dict[str, float] | None, device: Any = None, gpu: dict[str, float] | None = None):
        self.out, self.device, self.gpu, self.t = out, device, gpu, time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.out is None:
            return
        import torch

        if torch.cuda.is_available() and str(self.device).startswith("cuda"):
            torch.cuda.synchronize(self.device)
            if self.gpu is not None:  # the process's peak so far: the phase where it first reaches its last value
                self.gpu[name] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        now = time.perf_counter()
        self.out[name] = round(self.out.get(name, 0.0) + now - self.t, 3)
        self.t = now


def merged_rows(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every rank's GPTQ rows of one layer (the expert split), in rank order; a Linear that several ranks
    solved (anything but a routed expert: the same inputs, the same result on each) once."""
    seen: set[str] = set()
    out = []
    for part in parts:
        for row in part:
            if row["module"] not in seen:
                seen.add(row["module"])
                out.append(row)
    return out


def pack_layer(skeleton: Any, layer: Any, i: int) -> dict[str, Any]:
    """compressed-tensors' own compression of the layer's quantized modules; its tensors by checkpoint name."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(skeleton)
    compressor.compress_model(layer, skip_compressed=True)
    return {layer_prefix(i) + k: v.contiguous() for k, v in layer.state_dict().items()}


def break_module_cycles(layer: Any) -> None:
    """Drop the bound methods that modules of a finished layer keep in their own __dict__: compressed-tensors'
    offload wrapper stores a forward that closes over its module, llm-compressor's linearized experts store
    their parent's `_apply_gate`. Each is a reference cycle, freed only by the cyclic GC: the routed experts'
    packed weights piled up on the GPU (+0.59 GiB per 32-expert GLM-5.2 layer on the H200). The layer is not
    run again."""
    import types

    for m in layer.modules():
        for k in [k for k, v in m.__dict__.items() if isinstance(v, types.MethodType)]:
            del m.__dict__[k]
        m.__dict__.pop("_original_forward_func", None)


def restore_source_dtypes(tensors: dict[str, Any], source: Checkpoint) -> list[str]:
    """What quantize.restore_dtypes does after the memory engine's save: an unquantized tensor whose dtype
    differs from the source's is written with the source's bytes."""
    names = []
    src = source.tensors
    changed = [n for n, t in tensors.items() if n in src and _st_dtype(t) != src[n].dtype]
    if changed:
        tensors.update(read_tensors(source, changed))
        names = changed
    return names


def _st_dtype(t: Any) -> str:
    import torch

    return {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int32: "I32",
            torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}[t.dtype]


def final_config(cls: Any, config: Any, modifier: Any, out: Path, source_root: Path) -> Any:
    """config.json as llm-compressor's save writes it: transformers' config, `resave_config`, then
    compressed-tensors' `update_config` from the schemes the modifier attaches to a meta model of all layers."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.utils import patch_attr
    from llmcompressor.core import active_session
    from llmcompressor.modeling.moe import linear_experts
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.transformers.compression.compressed_tensors_utils import (
        resave_config,
        update_and_save_recipe,
    )

    model = meta_skeleton(cls, config)
    with contextlib.ExitStack() as stack, torch.device("meta"):  # names and schemes only: no weights to copy
        for c in (linear_experts.ExpertMLPWithGate, linear_experts.ExpertMLPWithoutGate):
            stack.enter_context(patch_attr(c, "copy_from_experts_module", lambda self, experts, index: None))
        stack.enter_context(patch_attr(linear_experts, "offload_module", lambda module, **kw: None))
        linearize_moe(model)
    session = active_session()
    session.reset()
    session.initialize(model=model, start=-1, recipe=modifier)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    config.save_pretrained(out)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    resave_config(config, out)
    compressor.update_config(out)
    update_and_save_recipe(str(source_root), str(out))
    session.reset()
    return compressor


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

        for _, t in named:
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            size = flat.numel()
            if flat.device.type == "cpu" and size >= self.chunk:
                if stage is not None:
                    sealed = seal()
                    if pending is not None:
                        _wait(pending[0])
                        yield pending[1]
                    pending = sealed
                if pending is not None:
                    _wait(pending[0])
                    yield pending[1]
                    pending = None
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
                    sealed = seal()
                    if pending is not None:
                        _wait(pending[0])
                        yield pending[1]
                    pending = sealed
        if stage is not None and fill:
            sealed = seal()
            if pending is not None:
                _wait(pending[0])
                yield pending[1]
            pending = sealed
        if pending is not None:
            _wait(pending[0])
            yield pending[1]

    def write(self, path: Path, named: list[tuple[str, Any]], metadata: dict[str, str] | None = None) -> str:
        """The file's sha256. `named`: (name, tensor) in file order (dtype, shape from the tensors)."""
        h = hashlib.sha256()
        header = safetensors_header_bytes(
            [(n, _st_dtype(t), tuple(t.shape), t.numel() * t.element_size()) for n, t in named], metadata)
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
                               None if layer is None else lambda: _kill_point("write", layer))


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


def quantize_stream(model_dir: Path, quant_ref: str, calib_ref: str, out_dir: Path,
                    restart: bool = False, split: str = "layers", read_threads: int | None = None) -> dict[str, Any]:
    import torch

    # MTPQUANT_STREAM_DETERMINISTIC=0: off on a GPU too (to measure what it costs or changes)
    on = torch.cuda.is_available() and os.environ.get("MTPQUANT_STREAM_DETERMINISTIC", "1") != "0"
    # the read thread outlives any error before the layers (the embedding is read from the start); the release
    # threads (the read buffers' unpinning, the old boundaries' unlinks: two, so neither waits for the other)
    # run beside the last layer and the final save: all are shut down here, whatever happened
    with deterministic(on) as settings, ThreadPoolExecutor(1, thread_name_prefix="stream-read") as reader, \
            ThreadPoolExecutor(2, thread_name_prefix="stream-release") as background:
        report = _quantize_stream(model_dir, quant_ref, calib_ref, out_dir, restart, split, reader, background,
                                  READ_THREADS if read_threads is None else read_threads)
    report["deterministic"] = settings
    return report


class _TimedExit:
    """`cm`, with the seconds its exit took into spans[name] (where the end of a run goes)."""

    def __init__(self, cm: Any, spans: dict[str, float], name: str):
        self.cm, self.spans, self.name = cm, spans, name

    def __enter__(self) -> Any:
        return self.cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        a = time.perf_counter()
        try:
            return self.cm.__exit__(*exc)
        finally:
            self.spans[self.name] = round(time.perf_counter() - a, 3)


def _timed(fn: Callable[[], Any], log: list[tuple[str, float]], name: str) -> Callable[[], None]:
    """fn, logging (name, its seconds): a release thread's step, for the report (list.append is atomic)."""
    def run() -> None:
        a = time.perf_counter()
        fn()
        log.append((name, time.perf_counter() - a))
    return run


@contextlib.contextmanager
def _released(buffers: ReadBuffers, background: ThreadPoolExecutor, out: list[Future],
              log: list[tuple[str, float]]) -> Iterator[None]:
    """The read buffers, released at the end if the last layer's build has not had them released: on an error
    at once, else on `background` (their future into `out`: unpinning GBs takes seconds)."""
    try:
        yield
    except BaseException:
        buffers.close()
        raise
    out.append(background.submit(_timed(buffers.close, log, "release_read_buffers")))


def _per_layer(journal: Journal, start: int) -> list[dict[str, Any]]:
    """Every layer's seconds and file hashes, by layer number, also those an earlier process finished
    (`resumed`: their timestamps count from that process's start)."""
    return [{"layer": e["layer"], "resumed": k < start, "shard_sha256": e["shard_sha256"],
             "activations_sha256": e["activations_sha256"], "host_rss_gib": e.get("host_rss_gib"), **e["seconds"]}
            for k, e in enumerate(journal.layers)]


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
    return _sha256_bytes("\n".join(sorted(names)).encode())


def _quantize_stream(model_dir: Path, quant_ref: str, calib_ref: str, out_dir: Path,
                     restart: bool, split_by: str, reader: ThreadPoolExecutor,
                     background: ThreadPoolExecutor, read_threads: int) -> dict[str, Any]:
    import torch
    import transformers
    from compressed_tensors.offload.utils import as_single_threaded
    from llmcompressor.args import DatasetArguments
    from llmcompressor.datasets.utils import format_calibration_data
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file

    from mtpquant.calib import ranks
    from mtpquant.calib.calibration import build_dataset

    # Several processes (torchrun), two splits. Neither sums anything across ranks (a Hessian all-reduce sums in
    # another order, and GPTQ's rounding turns that into different packed weights and then different
    # activations for every later layer), so both give the one-process bits: a run can resume with another
    # number of ranks, and the tests compare hashes.
    # `--split layers` (default): decoder layer i belongs to rank i % world, which reads only its layers'
    # tensors, calibrates and solves them on every sample, writes their shards and hands its layer's output
    # activations to the next layer's rank (point to point). It parallelizes the read + pack + write (2.3x the
    # GPU work in the first H200 runs: benchmarks/STREAM_H200.md) and each rank's host memory is its own
    # layers' buffers; the GPU work stays serial, one layer after the other. Rank 0 writes the journal (only
    # once the owner has said a layer's files are durable), the index, config and the shard of everything
    # outside the layers.
    # `--split experts` divides the GPU work: every rank reads and runs every layer on every token (the attention,
    # router and routed forwards are repeated on each), forms the down_proj Hessians and solves only its share
    # of the experts, in whole solve batches of one process, and the owners broadcast the solved weights
    # (mtpquant.calib.expert_gptq). What it divides is the all-experts Hessian pass and the solves, the bulk of
    # a MoE layer's GPU work; rank 0 writes (`Split.writes`). `mtpquant plan` models both.
    split = ranks.init_stream(split_by)
    timed_share = _timed_share() if split.world == 1 else None
    solo = as_single_threaded if split.world > 1 else contextlib.nullcontext  # a rank's solve and packing are
    # its own: llm-compressor's GPTQ would all-reduce Hessians with ranks that are not calibrating this layer
    reads = ReadLog()
    t0 = time.perf_counter()
    load_phases: dict[str, float] = {}  # where the time before the first layer's compute goes
    load_span = _Spans(load_phases)
    out_dir = Path(out_dir)
    source, config_dict, fam, qpath, cpath, recipe, calib, targets = checked_inputs(model_dir, quant_ref, calib_ref)
    load_span("inputs")
    if split.expert_share() is not None and recipe.fast_experts is None:
        raise MtpquantError(f"{qpath}: --split experts needs a fast_experts section (mtpquant.calib.expert_gptq "
                            "divides the experts; llm-compressor's GPTQModifier does not)")
    if recipe.pipeline != "sequential" or recipe.sequential_targets:
        raise MtpquantError(f"{qpath}: the stream engine runs whole decoder layers with the sequential pipeline "
                            "(pipeline: sequential, sequential_targets: null)")
    # the embedding (1.9 GB at GLM-5.2) is read while the tokenizer loads and the calibration data is tokenized
    embedding = reader.submit(read_tensors, source, [EMBED_NAME])

    tokenizer = transformers.AutoTokenizer.from_pretrained(source.root)
    load_span("tokenizer")
    dataset, data_summary = build_dataset(calib, tokenizer, str(cpath))
    with solo():  # every rank runs every sample (llm-compressor would partition them across ranks)
        loader = format_calibration_data(
            DatasetArguments(num_calibration_samples=len(dataset), max_seq_length=calib.max_seq_length,
                             shuffle_calibration_samples=False), dataset, tokenizer)
        batches = list(loader)
    load_span("calibration_data")
    # a layer's inputs and outputs are held at once
    place = placement(recipe, 2 * activation_bytes(config_dict, len(dataset), calib.max_seq_length))
    fp = fingerprint(source, qpath, cpath, data_summary["token_ids_sha256"])
    fp["deterministic_algorithms"] = str(torch.are_deterministic_algorithms_enabled())  # GPU outputs depend on it
    if timed_share is not None:
        fp["timed_share"] = str(timed_share)
    work = work_dir_for(out_dir)
    journal, start = open_journal(work, fp, restart, split)
    load_span("journal")

    config = transformers.AutoConfig.from_pretrained(source.root)
    cls = getattr(transformers, fam.architecture)
    skeleton = meta_skeleton(cls, config)
    n_layers = fam.num_layers(config_dict)
    n_shards = n_layers + 1
    expected = fam.routed_expert_linears(config_dict)

    buffers = ReadBuffers(source, pin=torch.cuda.is_available(), threads=read_threads)
    load_span("skeleton")

    def timed_read(i: int) -> tuple[dict[str, Any], float, float]:
        a = time.perf_counter()
        tensors = buffers.read(reads.record(layer_names(source, i)), functools.partial(_kill_point, "read", i))
        return tensors, a - t0, time.perf_counter() - t0

    device = ranks.local_device() if split.world > 1 else _main_device()  # the GPU when there is one
    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]stream[/] {task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} layers"), TimeElapsedColumn(), console=console,
                        disable=split.rank != 0)
    task = progress.add_task(fam.architecture, total=n_layers, completed=start)
    per_layer_s: list[dict[str, float]] = []  # this process's layers (their timestamps share t0)
    solved = 0  # the Linears this process solved
    recorded: list[Future] = []  # the writer thread's entry + journal steps: their errors are raised below
    recorded_s: list[dict[str, float]] = []

    out_writer = StreamWriter(pin=torch.cuda.is_available())

    def timed_write(i: int, box: list[dict[str, Any]], hidden: list[Any], prev: list[Any]) -> dict[str, Any]:
        """Layer i's shard (streamed in safetensors' own layout: the bytes save_file writes) and, unless it is
        the last layer (nothing comes after it), the activations at its boundary. `box`: [the packed tensors],
        taken out so that they are freed once the shard is written (the executor keeps the arguments until the
        call returns)."""
        tensors = box.pop()
        a = time.perf_counter()
        name = shard_name(i + 1, n_shards)
        shard_sha = save_shard(work / name, tensors, out_writer, i)
        b = time.perf_counter()
        shard_bytes = (work / name).stat().st_size
        del tensors
        acts_name = acts_sha = None
        acts_bytes = 0
        if i + 1 < n_layers:
            acts_name = f"activations-after-{i:05d}.safetensors"
            acts_sha = save_acts(work / acts_name, hidden, prev, out_writer)
            acts_bytes = (work / acts_name).stat().st_size
        c = time.perf_counter()
        return {"shard": name, "shard_sha256": shard_sha, "activations": acts_name, "activations_sha256": acts_sha,
                "write_start": a - t0, "write_end": c - t0, "write_shard": round(b - a, 3),
                "write_activations": round(c - b, 3), "shard_bytes": shard_bytes, "activations_bytes": acts_bytes}

    def journal_progress() -> None:
        """Rank 0: journal every layer whose files its owner has reported durable."""
        if journal is not None and journal.absorb():
            progress.update(task, completed=len(journal.layers))

    def record(entry: dict[str, Any], files: dict[str, Any]) -> None:
        """The writer thread, after the layer's files: its entry file, then (rank 0) the journal, which also has
        the boundary before deleted (only the newest is needed to resume). Not on the thread that drives the GPU,
        and the ~6 GB unlink on a thread of its own: on the H200 this took 1.7-1.8 s per layer, delaying the
        next write. The entry file is not fsynced: the journal is the durable record (fsynced), and an entry
        lost in a power cut only means that layer runs again."""
        a = time.perf_counter()
        atomic_write_json(work / entry_name(entry["layer"]),
                          {"layer": entry["layer"], **files, **{k: v for k, v in entry.items() if k != "layer"}},
                          fsync=False)
        b = time.perf_counter()
        journal_progress()
        recorded_s.append({"layer": entry["layer"], "entry": round(b - a, 3),
                           "journal": round(time.perf_counter() - b, 3)})

    def finish(pending: tuple[Future, dict[str, Any]]) -> None:
        """Waits for a layer's shard and activations to be durable, then (only then) has its entry file written,
        which rank 0 journals."""
        fut, entry = pending
        w0 = time.perf_counter()
        files = fut.result()
        waited = time.perf_counter() - w0
        t = entry["seconds"]
        t.update(write=round(files.pop("write_end") - files["write_start"], 3), waited_for_write=round(waited, 3),
                 write_start=round(files.pop("write_start"), 3),
                 **{k: files.pop(k) for k in ("write_shard", "write_activations", "shard_bytes", "activations_bytes")})
        recorded.append(writer.submit(record, entry, files))
        per_layer_s.append(t)

    # I/O overlaps compute: one thread reads this rank's next layer while its current one calibrates (at most one
    # layer ahead), one writes its layer's shard while its next layer computes (at most one write in flight;
    # with several ranks also while the other ranks compute theirs); a layer is journaled only once its files
    # are durable, so resume is as before
    # (exits in reverse: the writer, which submits the unlinks to `background`, is shut down first)
    tail: dict[str, float] = {}  # the seconds after the last layer's compute, by step
    released: list[Future] = []
    release_log: list[tuple[str, float]] = []  # the release threads' steps
    with progress, _released(buffers, background, released, release_log), \
            _TimedExit(contextlib.closing(out_writer), tail, "close_writer"), \
            reader, \
            _TimedExit(ThreadPoolExecutor(1, thread_name_prefix="stream-write"), tail, "writer_thread") as writer:
        # this rank's first layer is read while the calibration batches are embedded (0.65 s exposed on the H200)
        mine = split.mine(start, n_layers)
        ahead = reader.submit(timed_read, mine[0]) if mine else None

        # every rank needs the other arguments of a decoder layer (masks, rotary tables); only the first
        # layer's rank uses the hidden states, and each batch goes where activations wait as soon as it is
        # embedded: all of them on the host at once (4.8 GB at GLM-5.2's 393K tokens) set the host's peak on the
        # H200 (glibc keeps the freed heap). Inside the with-block: an error here shuts the early read down.
        keep = start == 0 and split.owns(0)
        load_span("start_threads")
        hidden, kwargs = layer_inputs(skeleton, config, source, batches, place.put if keep else lambda t: None,
                                      load_phases, embedding, device)
        load_span.t = time.perf_counter()
        reads.record([EMBED_NAME])
        prev: list[Any] | None = [None] * len(hidden)
        if 0 < start < n_layers and split.owns(start):  # resume: the activations after the last finished layer
            hidden, prev = place.put(load_acts(work / f"activations-after-{start - 1:05d}.safetensors"))
        if not split.owns(start):
            hidden = prev = None
        kwargs = _to(kwargs, place.device)  # masks and rotary tables wait with the activations (moved once)
        load_span("inputs_in_place")  # resumed activations, masks and rotary tables moved to the GPU
        t_load = time.perf_counter()
        if journal is not None:
            # the old boundary's unlink (~6 GB) off the writer's path; the last one (1.2-1.6 s on the H200, the
            # run's last step when it ran before the final save) beside the final save, like the read buffers
            journal.discard = lambda p: released.append(background.submit(
                _timed(functools.partial(p.unlink, missing_ok=True), release_log, "unlink_boundaries")))
        pending: tuple[Future, dict[str, Any]] | None = None
        for i in range(start, n_layers):
            nxt = i + 1 if i + 1 < n_layers else None
            if not split.owns(i):
                if nxt is not None and split.owns(nxt):  # the next layer is mine: its inputs come from layer i's
                    hidden, prev = place.put(ranks.recv_tensors(split.owner(i)))
                writer.submit(journal_progress)  # the journal is the writer thread's while the layers run
                continue
            w0 = time.perf_counter()
            tensors, r_start, r_end = ahead.result()
            waited_read = time.perf_counter() - w0
            later = [k for k in mine if k > i]
            ahead = reader.submit(timed_read, later[0]) if later else None
            tb = time.perf_counter()
            meta_layer = skeleton.model.layers[i]
            phases: dict[str, float] = {}
            gpu_gib: dict[str, float] = {}
            span = _Spans(phases, device, gpu_gib)
            with solo():  # linearizing offloads through compressed-tensors' caches: per rank too
                layer = build_layer(skeleton, i, source, device, tensors)
                del tensors
                span("build")  # the GPU synchronized: the layer's copies out of the read buffer are done
                if ahead is None:  # this rank's last layer: the read buffers are unpinned beside its compute
                    # (at the end, 2.7 s of the H200's tail, after the last boundary's unlink on one thread)
                    released.append(background.submit(_timed(buffers.close, release_log, "release_read_buffers")))
                hidden, prev, rows, counts, mod_state = calibrate_layer(
                    skeleton, i, layer, recipe, targets, hidden, prev, kwargs, fam, config_dict, device, place,
                    share=split.expert_share() or timed_share, spans=phases, gpu=gpu_gib)
                span.t = time.perf_counter()
                packed = pack_layer(skeleton, layer, i) if split.writes(i) else None
                span("pack")
            solved += len(rows)
            if split.expert_share() is not None:  # each rank logged the Linears it solved
                rows = merged_rows(ranks.gather(rows, ranks.control()))
                span("gather")
            skeleton.model.layers[i] = meta_layer  # the real layer is dropped: its weights are freed
            break_module_cycles(layer)
            del layer
            if packed is None:  # the expert split: rank 0 writes
                writer.submit(journal_progress)
                continue
            restored = restore_source_dtypes(packed, source)
            reads.record(restored)
            tc = time.perf_counter()
            if pending is not None:
                finish(pending)
            entry = {"layer": i, "tensors": sorted(packed), "per_linear": rows,
                     "routing_counts": counts.tolist() if counts is not None else None,
                     "dtype_restored": restored, "modifier": mod_state, "host_rss_gib": host_rss_gib(),
                     "seconds": {"read": round(r_end - r_start, 3), "waited_for_read": round(waited_read, 3),
                                 "compute": round(tc - tb, 3), "read_start": round(r_start, 3),
                                 **{f"compute_{k}": v for k, v in phases.items()},
                                 **{f"gpu_peak_gib_after_{k}": v for k, v in gpu_gib.items()},
                                 "compute_start": round(tb - t0, 3), "compute_end": round(tc - t0, 3)}}
            if nxt is not None and not split.owns(nxt):
                ranks.send_tensors((hidden, prev), split.owner(nxt))
            # the writer's own lists: the next layer's propagation pass empties these as it goes
            pending = (writer.submit(timed_write, i, [packed], list(hidden), list(prev)), entry)
            del packed
            if not split.owns(nxt if nxt is not None else i):  # the next layer's inputs come from another rank
                hidden = prev = None
        if pending is not None:
            finish(pending)
    a = time.perf_counter()
    for f in recorded:
        f.result()
    tail["entries"] = round(time.perf_counter() - a, 3)
    if journal is not None:
        journal.discard = Journal.unlink
    # every rank's layers are durable once all have come here (the gather is the barrier)
    per_rank = ranks.gather({"rank": split.rank, "reads": reads.summary(source), "io": _io(per_layer_s),
                             "solved_linears": solved, "host_rss_gib": host_rss_gib(), "memory": peak_memory()},
                            ranks.control())
    if split.rank != 0:
        return {"stage": "quantize", "engine": "stream", "rank": split.rank, "ranks": split.world,
                "reads": per_rank[split.rank]["reads"]}
    journal_progress()
    if len(journal.layers) != n_layers:
        missing = [i for i in range(len(journal.layers), n_layers) if not (work / entry_name(i)).is_file()]
        raise MtpquantError(f"quantize --engine stream: layers {missing[:5]} have no durable files in {work}")
    t_calib = time.perf_counter()

    # the rest: every tensor outside the decoder layers (MTP layers are dropped, as the memory engine does)
    in_model = set(skeleton.state_dict())
    rest_names = reads.record([n for n in source.weight_map if not n.startswith(LAYERS) and n in in_model])
    rest = read_tensors(source, rest_names)
    per_rank[0]["reads"] = reads.summary(source)
    modifier = modifier_for(recipe, targets)
    for e in journal.layers:  # fields the solve resolved (e.g. batched_quantization "auto"), as recipe.yaml
        for k, v in e["modifier"].items():  # of the memory engine records them
            setattr(modifier, k, v)
    with atomic_dir(out_dir) as tmp, solo():
        weight_map: dict[str, str] = {}
        total = 0
        for entry in journal.layers:
            os.link(work / entry["shard"], tmp / entry["shard"])
            weight_map.update(dict.fromkeys(entry["tensors"], entry["shard"]))
        last = shard_name(n_shards, n_shards)
        save_file(rest, str(tmp / last), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(rest, last))
        for f in set(weight_map.values()):
            total += (tmp / f).stat().st_size
        atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))})
        final_config(cls, config, modifier, tmp, source.root)
        tokenizer.save_pretrained(tmp)
    a = time.perf_counter()
    for f in released:  # the old boundaries unlinked and the read buffers released while the rest was saved
        f.result()
    tail["waited_for_release"] = round(time.perf_counter() - a, 3)
    shutil.rmtree(work, ignore_errors=True)
    t_save = time.perf_counter()

    rows = [r for e in journal.layers for r in e["per_linear"]]
    counts = {e["layer"]: torch.tensor(e["routing_counts"]) for e in journal.layers if e["routing_counts"]}
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    report = {
        "stage": "quantize", "engine": "stream", "engine_version": ENGINE_VERSION,
        "model": str(source.root), "family": fam.model_type, "output": str(out_dir),
        "recipe": {"path": str(qpath), "sha256": recipes.recipe_sha256("quant", qpath), "targets": targets},
        "calibration": {"path": str(cpath), "sha256": recipes.recipe_sha256("calibration", cpath), **data_summary},
        "activations_on": place.device, "activations_pinned": place.pin, "resumed_after_layers": start,
        "read_buffers": {"bytes": buffers.peak_bytes, "pinned": buffers.was_pinned,
                         "bytes_read": buffers.bytes_read, "threads": buffers.threads},
        "quantized_linears": len(rows), "expected_linears": len(expected), "ranks": split.world,
        "split": split.by, "timed_share": timed_share,
        "per_rank": per_rank,
        "gptq_loss_median": statistics.median(losses) if losses else None,
        "gptq_loss_max": max(losses) if losses else None,
        "few_token_experts": few_token_experts(counts, fam.experts_per_token(config_dict, default=1)),
        "routing_counts": {str(k): v.tolist() for k, v in counts.items()},
        "dtype_restored": sorted(n for e in journal.layers for n in e["dtype_restored"]),
        "seconds": {"load": round(t_load - t0, 2), "load_phases": load_phases, "tail_phases": tail,
                    "release_phases": {k: round(sum(t for n, t in release_log if n == k), 3)
                                       for k in sorted({n for n, _ in release_log})},
                    "calibrate_and_solve": round(t_calib - t_load, 2),
                    "save": round(t_save - t_calib, 2), "total": round(t_save - t0, 2),
                    "per_layer": _per_layer(journal, start), "record": recorded_s,
                    "io": round(sum(r["io"]["io"] for r in per_rank), 3),
                    "io_hidden": round(sum(r["io"]["io_hidden"] for r in per_rank), 3)},
        "memory": peak_memory(),
        "per_linear": rows,
        "rank": 0,
    }
    if len(rows) != len(expected) and timed_share is None:
        raise MtpquantError(f"GPTQ compressed {len(rows)} Linears, expected {len(expected)}")
    return report


def _io(per_layer_s: list[dict[str, float]]) -> dict[str, float]:
    """This process's read + write seconds, and how much of it ran while it (or another rank) computed."""
    return {"io": round(sum(t["read"] + t["write"] for t in per_layer_s), 3),
            "io_hidden": round(sum(max(0.0, t["read"] - t["waited_for_read"]) +
                                   max(0.0, t["write"] - t["waited_for_write"]) for t in per_layer_s), 3)}


def _timed_share() -> tuple[int, int] | None:
    """Benchmarks only: MTPQUANT_STREAM_TIMED_SHARE=R/W makes one process do rank R's GPU work of the expert split
    over W ranks (its Hessians and solves; nothing is broadcast, so the other experts stay unsolved and the
    artifact is not a valid one), to time a rank's layer on one GPU when several are not at hand."""
    text = os.environ.get("MTPQUANT_STREAM_TIMED_SHARE")
    if not text:
        return None
    try:
        rank, world = (int(x) for x in text.split("/"))
    except ValueError:
        raise MtpquantError(f"MTPQUANT_STREAM_TIMED_SHARE: expected RANK/WORLD, got {text!r}") from None
    if not 0 <= rank < world:
        raise MtpquantError(f"MTPQUANT_STREAM_TIMED_SHARE: rank {rank} is not in 0..{world - 1}")
    return rank, world


def _main_device() -> Any:
    from llmcompressor.utils.dev import get_main_device

    return get_main_device()
