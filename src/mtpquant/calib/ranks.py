"""torchrun support for the quantize stage: one process per GPU, data parallel (llm-compressor's distributed
oneshot splits the calibration samples across ranks); rank 0 writes every output."""

from __future__ import annotations

import os
from typing import Any


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


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] without torchrun)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
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


def share(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
