"""torchrun support for the quantize stage: one process per GPU. The memory engine is data parallel
(llm-compressor's distributed oneshot splits the calibration samples across ranks; rank 0 writes every output);
the stream engine splits by decoder layer or by routed expert (`init_stream`, `Split`; `send_tensors` /
`recv_tensors`: mtpquant.calib.stream says why)."""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any

_CONTROL: Any = None  # the stream engine's gloo group for small messages (objects), beside the default group


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> int:
    """Join the process group when started by torchrun with several processes; returns this rank."""
    import torch.distributed as dist

    if world() > 1 and not dist.is_initialized():
        import torch

        # compressed-tensors' shared CPU offload (DistributedCPUCache.offload) calls share_memory_() and then
        # _share_filename_cpu_() on every tensor: with the default file_descriptor strategy that copies each
        # tensor into shared memory twice (fd-backed, then file-backed); with file_system, once
        # (MTPQUANT_SHARING_STRATEGY=file_descriptor: torch's default, for comparison)
        torch.multiprocessing.set_sharing_strategy(os.environ.get("MTPQUANT_SHARING_STRATEGY", "file_system"))

        if torch.accelerator.is_available():
            from compressed_tensors.offload import init_dist

            init_dist()  # NCCL, one GPU per local rank
        else:  # CPU processes (tests): gloo
            dist.init_process_group("gloo", init_method="env://")
    return dist.get_rank() if dist.is_initialized() else 0


def load_model(cls: Any, path: Any, dtype: Any) -> Any:
    """llm-compressor's loading route for big models: CPU, spilling to disk when RAM runs short; under
    torchrun rank 0 reads the weights and shares them with the other ranks (one copy in host RAM).
    MTPQUANT_DIST_LOAD=per-rank makes every rank read its own copy instead."""
    from compressed_tensors.offload import load_offloaded_model

    if world() > 1 and os.environ.get("MTPQUANT_DIST_LOAD") == "per-rank":
        return cls.from_pretrained(path, dtype=dtype)
    with load_offloaded_model(cls):
        return cls.from_pretrained(path, dtype=dtype, device_map="auto_offload")


def linearize(model: Any) -> Any:
    """llm-compressor's `linearize_moe` (fused 3-D experts -> one Linear per expert). Under torchrun only the
    source rank copies the expert slices: every other rank's copy is thrown away unread when compressed-
    tensors' shared CPU offload maps the source rank's shared memory over it (`DistributedCPUCache.offload`),
    so those ranks skip the copy, leaving their new tensors untouched (unfaulted) memory. In run C two ranks
    took 44 s to load and linearize against 11 s for one process and four did not finish in 130 s
    (CALIB_SPEED.md, "The slow load under torchrun": rank 1's peak RSS 2.7 -> 0.5 GB at E = 16 on a CPU)."""
    import contextlib

    import torch.distributed as dist
    from llmcompressor.modeling.moe import linear_experts
    from llmcompressor.modeling.moe.linearize import linearize_moe

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return linearize_moe(model)
    from compressed_tensors.distributed import is_source_process
    from compressed_tensors.utils import patch_attr

    if is_source_process():
        return linearize_moe(model)
    with contextlib.ExitStack() as stack:
        for cls in (linear_experts.ExpertMLPWithGate, linear_experts.ExpertMLPWithoutGate):
            stack.enter_context(patch_attr(cls, "copy_from_experts_module", lambda self, experts, index: None))
        return linearize_moe(model)


def gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] without torchrun)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def my_samples(dataset: Any) -> Any:
    """This rank's contiguous share of the calibration samples. llm-compressor 0.14.0.1 partitions a dataset
    that is identical on every rank, but its sampler then indexes the unpartitioned dataset, so every rank
    calibrates on the first 1/N of the samples (seen here: identical Hessians on both ranks). Handing each
    rank a different dataset sidesteps that."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return dataset
    n, r, w = len(dataset), dist.get_rank(), dist.get_world_size()
    return dataset.select(range(n * r // w, n * (r + 1) // w))


def share(obj: Any, group: Any = None) -> Any:
    """Rank 0's `obj` on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def batch_owners(n: int, batch: int, world: int) -> list[int]:
    """The rank that owns each of `n` items solved `batch` at a time in one process: whole batches, in
    contiguous runs, the batches spread as evenly as they divide (13 batches on 8 ranks: 1 or 2 each)."""
    batches = math.ceil(n / batch)
    return [(k // batch) * world // batches for k in range(n)]


def down_batch(batched_quantization: str | int | None, solve_rows: int, rows: int) -> int:
    """How many down_proj modules llm-compressor solves at once here: `on_sequential_epoch_end` resolves
    "auto" to solve_rows // rows before the solve; None solves one at a time."""
    if batched_quantization is None:
        return 1
    if batched_quantization == "auto":
        return rows_batch(solve_rows, rows)
    return int(batched_quantization)


def rows_batch(solve_rows: int, rows: int) -> int:
    """How many modules of `rows` weight rows are solved at once within `solve_rows` rows (the gate/up solve,
    and down_proj's "auto"): at least one."""
    return max(1, solve_rows // rows)


SPLITS = ("layers", "experts")


@dataclass(frozen=True)
class Split:
    """The stream engine's division of work (mtpquant.calib.stream says why each exists). "layers": decoder
    layer i belongs to rank i % world, which computes and writes it. "experts": every rank runs every layer
    on every token and solves its share of the routed experts (mtpquant.calib.expert_gptq.batch_owners);
    rank 0 writes."""

    rank: int = 0
    world: int = 1
    by: str = "layers"

    def owner(self, i: int) -> int:
        """The rank that computes layer i and holds its outputs."""
        return i % self.world if self.by == "layers" else self.rank

    def owns(self, i: int) -> bool:
        return self.owner(i) == self.rank

    def writes(self, i: int) -> bool:
        """Whether this rank writes layer i's shard and activations."""
        return self.owns(i) if self.by == "layers" else self.rank == 0

    def mine(self, start: int, stop: int) -> list[int]:
        return [i for i in range(start, stop) if self.owns(i)]

    def expert_share(self) -> tuple[int, int] | None:
        return (self.rank, self.world) if self.by == "experts" and self.world > 1 else None


def init_stream(by: str = "layers") -> Split:
    """Joins torchrun's process group through its env:// rendezvous (RANK, WORLD_SIZE, MASTER_ADDR/PORT: the
    same on one node or several), NCCL with one GPU per LOCAL_RANK when there are GPUs, else gloo; plus a gloo
    group for small messages. MTPQUANT_DIST_TIMEOUT_S (default 3600): how long a rank waits for another (a rank
    idles while the others compute their layers). One process without torchrun: Split(0, 1), no group."""
    global _CONTROL
    import torch
    import torch.distributed as dist

    if by not in SPLITS:
        from mtpquant.core.errors import MtpquantError

        raise MtpquantError(f"--split: unknown split {by!r} (known: {', '.join(SPLITS)})")
    if world() == 1:
        return Split(by=by)
    timeout = datetime.timedelta(seconds=float(os.environ.get("MTPQUANT_DIST_TIMEOUT_S", "3600")))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=timeout)
    if _CONTROL is None:
        _CONTROL = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo",
                                                                                        timeout=timeout)
    return Split(dist.get_rank(), dist.get_world_size(), by)


def control() -> Any:
    """The gloo group for objects (None without torchrun)."""
    return _CONTROL


def local_device() -> Any:
    """This rank's GPU (cuda:LOCAL_RANK: llm-compressor's get_main_device takes the global rank, wrong on a
    second node), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class _Slot:
    """Where the k-th sent tensor goes back into its structure."""

    def __init__(self, k: int):
        self.k = k


def _strip(obj: Any, flat: list[Any]) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        flat.append(obj)
        return _Slot(len(flat) - 1)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_strip(x, flat) for x in obj)
    if isinstance(obj, dict):
        return {k: _strip(v, flat) for k, v in obj.items()}
    return obj


def _fill(spec: Any, flat: list[Any]) -> Any:
    if isinstance(spec, _Slot):
        return flat[spec.k]
    if isinstance(spec, (tuple, list)):
        return type(spec)(_fill(x, flat) for x in spec)
    if isinstance(spec, dict):
        return {k: _fill(v, flat) for k, v in spec.items()}
    return spec


def _comm_device() -> Any:
    import torch.distributed as dist

    return local_device() if dist.get_backend() == "nccl" else "cpu"


def send_tensors(obj: Any, dst: int) -> None:
    """`obj` (nested tuples, lists, dicts of tensors and plain values) to rank `dst`: its structure, shapes and
    dtypes as one object on the gloo group, then each tensor point to point on the default group (NCCL between
    GPUs: no host copy)."""
    import torch.distributed as dist

    flat: list[Any] = []
    spec = _strip(obj, flat)
    metas = [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in flat]
    dist.send_object_list([(spec, metas)], dst=dst, group=_CONTROL)
    dev = _comm_device()
    for t in flat:
        dist.send(t.to(dev).contiguous(), dst=dst)


def recv_tensors(src: int) -> Any:
    """What rank `src` sent with send_tensors (tensors on this rank's communication device)."""
    import torch
    import torch.distributed as dist

    box: list[Any] = [None]
    dist.recv_object_list(box, src=src, group=_CONTROL)
    spec, metas = box[0]
    dev = _comm_device()
    flat = []
    for shape, dtype in metas:
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=dev)
        dist.recv(t, src=src)
        flat.append(t)
    return _fill(spec, flat)
