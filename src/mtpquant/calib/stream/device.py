"""Where the stream engine's activations wait between layers, the settings that make a GPU run reproduce itself,
and the per-phase timer that synchronizes the GPU.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mtpquant.calib.quantize import (
    activation_device,
)
from mtpquant.model.recipes import QuantRecipe


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
            return move_to(obj, self.device)
        return map_tensors(obj, _pinned_copy)


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


def map_tensors(obj: Any, fn: Callable[[Any], Any], leaf: type | None = None) -> Any:
    """`fn` applied to every tensor (or every instance of `leaf`) in (nested tuples, lists, dicts of) `obj`."""
    if leaf is None:
        import torch

        leaf = torch.Tensor
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(x, fn, leaf) for x in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn, leaf) for k, v in obj.items()}
    return obj


def move_to(obj: Any, device: Any) -> Any:
    """Tensors in (nested tuples, lists, dicts of) `obj` moved to `device` (the same objects where they are)."""
    return map_tensors(obj, lambda t: t.to(device))


class Spans:
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
