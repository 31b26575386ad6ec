"""GPTQ for routed experts, several times faster, with llm-compressor as the engine.

With every expert calibrated on every token (`moe_calibrate_all_experts`), the gate_proj and up_proj of
every expert in a MoE layer see the same input X, so they all have the same Hessian 2·XᵀX/n. llm-compressor
keeps 2·E FP32 copies of it ([H, H] each: 77 GB for a GLM-5 layer) and computes each with its own FP32
matmul in a forward hook. `ExpertGPTQModifier` (a GPTQModifier) instead:

- keeps one gate/up Hessian per MoE layer and one down_proj Hessian per expert (the input of down_proj,
  act(gate(X))·up(X), differs per expert);
- lets the model's forward route tokens normally (only routed outputs flow on, as in llm-compressor) and
  runs the all-experts pass for the Hessians itself, on `token_chunk` buffered tokens at a time, so every
  matmul is large;
- forms XᵀX from the bf16 activations with FP32 accumulation (`hessian_inputs: bf16`): a product of two
  bf16 numbers is exact in FP32, so only the summation order differs from llm-compressor's FP32 matmul;
- solves the gate/up rows of all experts against one factorization of the shared Hessian with
  llm-compressor's own GPTQ pieces (activation ordering, `factorize_hessian`, the Triton block kernel),
  `solve_rows` rows at a time, and hands the down_proj Hessians to llm-compressor's batched solver;
- under torchrun, is data parallel like llm-compressor's distributed oneshot: each rank calibrates its
  share of the samples, the shared Hessians are all-reduced, each rank solves a contiguous block of experts
  and broadcasts the results (down_proj goes through llm-compressor's reduce-to-owner path);
- or, with `expert_share` (the stream engine's expert split), every rank sees every token and the experts'
  work is divided: a rank forms the down_proj Hessians only of the experts whose solve it owns, solves only
  its own, and the owners broadcast the results. Ownership goes by whole solve batches of one process
  (`batch_owners`), so each batch has the same members, shapes and inputs as in one process and the results
  are the same bits: nothing is summed across ranks.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from compressed_tensors.offload.dist_utils import is_distributed
from compressed_tensors.quantization import ActivationOrdering, QuantizationStrategy
from compressed_tensors.quantization.quant_args import QuantizationArgs
from compressed_tensors.utils import get_execution_device, getattr_chain, match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.gptq_quantize import gptq_block_update
from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION, factorize_hessian, update_batch_qparams
from llmcompressor.modifiers.quantization.quantization import QuantizationMixin
from llmcompressor.utils.dist import broadcast_qparams_and_cleanup
from pydantic import PrivateAttr
from torch import distributed as dist

from mtpquant.calib.ranks import batch_owners, down_batch, rows_batch

_GPTQ_Q_PARAMS = ["weight", "weight_scale", "weight_zero_point"]
_MM_OUT_DTYPE = [True]
_GROUPED_MM = [True]


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def add_gram(acc: torch.Tensor, x: torch.Tensor, inputs: str) -> None:
    """acc (FP32 [k, k]) += xᵀx for x [n, k]. `inputs`: the operand precision (fp32, tf32 or bf16).

    bf16 operands with an FP32 result need CUDA (`torch.mm(..., out_dtype=)`); elsewhere the operands are
    upcast to FP32, which gives the same products.
    """
    if inputs == "bf16" and x.is_cuda and x.dtype == torch.bfloat16 and _MM_OUT_DTYPE[0]:
        try:
            acc.add_(torch.mm(x.t(), x, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=): same products through FP32
            _MM_OUT_DTYPE[0] = False
    xf = x.to(torch.float32)
    with _tf32(inputs != "fp32"):
        acc.addmm_(xf.t(), xf)


@dataclass(eq=False)
class ExpertLayer:
    """One MoE layer's routed experts and their running Hessian statistics."""

    name: str
    module: torch.nn.Module
    experts: list[torch.nn.Module]
    gate_up: torch.Tensor | None = None  # Σ xᵀx over the layer's input, shared by every gate/up_proj
    down: torch.Tensor | None = None  # [len(owned), I, I]: Σ aᵀa per owned expert, a = act(gate(x)) * up(x)
    down_owners: list[int] | None = None  # each expert's owner under the expert split (rank 0 otherwise)
    owned: list[int] | None = None  # the experts whose down_proj this rank solves, in order: layer.down's rows
    calls: int = 0  # forward calls seen: llm-compressor's `num_samples` for 2-D expert inputs
    pending: list[torch.Tensor] = field(default_factory=list)
    pending_tokens: int = 0
    stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # for grouped_mm; rebuilt after the solve

    def linears(self) -> Iterator[torch.nn.Module]:
        for e in self.experts:
            yield from (e.gate_proj, e.up_proj, e.down_proj)


def sorted_routed_forward(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """LinearExperts2D's routed forward (every token through its top-k experts, weighted, summed) with the
    tokens sorted by expert once: one host sync per call instead of one `torch.where` per expert, and no
    launches for experts no token chose. The all-experts pass for the Hessians is the modifier's own."""
    num_experts, k = experts.num_experts, top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token = order // k
    x = hidden_states[token]
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = experts[e](x[start:start + n])
            start += n
    weighted = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, token, weighted.to(hidden_states.dtype))


def stack_experts(experts: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """([E, 2I, H] gate|up weights, [E, H, I] down weights) of a LinearExperts2D, for grouped GEMMs."""
    items = [experts[e] for e in range(experts.num_experts)]
    gate_up = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in items])
    return gate_up, torch.stack([m.down_proj.weight for m in items])


def grouped_routed_forward(experts: torch.nn.Module, stacked: tuple[torch.Tensor, torch.Tensor],
                           hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The routed forward as two grouped GEMMs over tokens sorted by expert (`torch._grouped_mm`): a few
    launches per call instead of several per expert, and no host sync."""
    gate_up, down = stacked
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=experts.num_experts), 0).to(torch.int32)
    token = order // k
    x = hidden_states[token].to(gate_up.dtype)
    act = experts._apply_gate(torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs))
    out = torch._grouped_mm(act, down.transpose(1, 2), offs=offs)
    weighted = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, token, weighted.to(hidden_states.dtype))


def shared_hessian_solve(weights: torch.Tensor, hinv: torch.Tensor, perm: torch.Tensor | None,
                         dead: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         g_idx: torch.Tensor | None, quant_args: QuantizationArgs,
                         blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of many weight rows [R, K] that share one Hessian, given its factor `hinv` (upper Cholesky of
    the inverse, in permuted order). llm-compressor's `quantize_weight` loop for one batch item, keeping
    the loss of every row and updating the tail in place. Returns (quantized rows, loss per row)."""
    w = weights[:, perm] if perm is not None else weights
    if dead.any():
        w[:, dead] = 0
    rows, cols = w.shape
    losses = torch.zeros(rows, device=w.device, dtype=GPTQ_PRECISION)
    scale3, zp3 = scale.unsqueeze(0), zero_point.unsqueeze(0)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone().unsqueeze(0)
        q1, err1, loss1 = torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w1)
        gptq_block_update(w1, hinv[None, i1:i2, i1:i2], q1, err1, loss1, scale=scale3, zero_point=zp3,
                          global_scale=None, g_idx=g_idx, quant_args=quant_args, i1=i1)
        w[:, i1:i2] = q1[0]
        losses += loss1[0].sum(dim=1) / 2
        if i2 < cols:
            w[:, i2:].addmm_(err1[0], hinv[i1:i2, i2:], alpha=-1)
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w, losses


def factor_shared(hessian: torch.Tensor, quant_args: QuantizationArgs,
                  percdamp: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, bool]:
    """(hinv, perm, dead columns, g_idx, fell back to RTN) for a normalized Hessian, as quantize_weight
    computes them for one module (activation ordering, dead columns, dampening, Cholesky)."""
    cols = hessian.shape[0]
    perm = None
    if quant_args.actorder in (ActivationOrdering.STATIC, ActivationOrdering.WEIGHT):
        perm = torch.argsort(torch.diagonal(hessian), descending=True)
        hessian = hessian[perm][:, perm]
    elif quant_args.actorder:
        raise ValueError(f"unsupported activation ordering {quant_args.actorder}")
    dead = torch.diagonal(hessian) == 0
    fallback = torch.zeros(1, dtype=torch.bool, device=hessian.device)
    dummy = torch.empty(1, 1, cols, device=hessian.device, dtype=GPTQ_PRECISION)
    hinv = factorize_hessian(dummy, hessian.unsqueeze(0).contiguous(), percdamp, fallback)[0]
    g_idx = None
    if quant_args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        g_idx = torch.arange(cols, device=hessian.device, dtype=torch.int) // quant_args.group_size
        if quant_args.actorder == ActivationOrdering.WEIGHT:
            g_idx = g_idx[perm]
    return hinv, perm, dead, g_idx, bool(fallback.item())


def expert_layers(model: torch.nn.Module, targeted: set[torch.nn.Module]) -> list[ExpertLayer]:
    """Linearized MoE blocks whose every gate/up/down Linear is a GPTQ target."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LinearExperts2D) and getattr(mod, "has_gate", False):
            layer = ExpertLayer(name, mod, [mod[i] for i in range(mod.num_experts)])
            if all(lin in targeted for lin in layer.linears()):
                out.append(layer)
    return out


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


class ExpertGPTQModifier(GPTQModifier):
    """GPTQModifier whose routed experts are calibrated and solved as the module docstring says; every
    other target goes through the parent unchanged."""

    hessian_inputs: str = "bf16"
    token_chunk: int = 16384
    solve_rows: int = 131072
    routed_forward: str = "grouped_mm"  # grouped_mm | sorted | llm_compressor
    overlap_weights: bool = False  # prefetch the next decoder layer, write back in the background
    expert_share: tuple[int, int] | None = None  # (rank, world) of the expert split (module docstring)

    _layers: list[ExpertLayer] = PrivateAttr(default_factory=list)
    _timings: dict[str, float] = PrivateAttr(default_factory=dict)
    _transfers: Any = PrivateAttr(default=None)  # mtpquant.calib.weight_transfers.WeightTransfers

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        ok = super().on_initialize(state, **kwargs)
        self._layers = expert_layers(state.model, set(self._module_names))
        return ok

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        QuantizationMixin.start_calibration(self, state.model)
        handled = {lin for layer in self._layers for lin in layer.linears()}
        for _, module in match_named_modules(state.model, self.resolved_targets, self.ignore):
            if module in handled or isinstance(module, torch.nn.Embedding):
                continue
            if getattr_chain(module, "quantization_scheme.weights", None) is not None:
                self.register_hook(module, self.calibrate_module, "forward")
        for layer in self._layers:
            self.register_hook(layer.module, self._hook_for(layer), "forward_pre")
            if self.routed_forward != "llm_compressor":
                layer.module.forward = functools.partial(self._routed, layer)
        if not handled and not self._hooks:
            raise ValueError("ExpertGPTQModifier found no modules to quantize")
        if self.overlap_weights:
            self._start_transfers(state.model)

    def _start_transfers(self, model: torch.nn.Module) -> None:
        """Prefetch decoder layers 0 and 1 now (the embedding subgraph runs first) and layer i+1 when layer i
        first runs in its calibration pass: one layer ahead, as GPU room allows (the sequential pipeline's
        subgraphs are the decoder layers: the model's `_no_split_modules`)."""
        from mtpquant.calib.weight_transfers import WeightTransfers

        self._transfers = WeightTransfers()
        self._transfers.install()
        kinds = set(getattr(model, "_no_split_modules", None) or [])
        decoder = [m for m in model.modules() if type(m).__name__ in kinds]
        if not decoder:
            return
        for layer in decoder[:2]:
            self._transfers.prefetch(layer)
        started: set[int] = set()

        def hook_for(i: int) -> Any:
            def first_call(_module: torch.nn.Module, _args: tuple[Any, ...]) -> None:
                if i not in started:
                    started.add(i)
                    if i + 1 < len(decoder):
                        self._transfers.prefetch(decoder[i + 1])
            return first_call

        for i, layer in enumerate(decoder):
            self.register_hook(layer, hook_for(i), "forward_pre")

    def _stop_transfers(self) -> None:
        if self._transfers is not None:
            self._transfers.close()
            self._timings.update(self._transfers.stats)
            self._transfers = None

    def on_calibration_end(self, state: State, event: Event, **kwargs: Any) -> None:
        for layer in self._layers:
            layer.module.__dict__.pop("forward", None)  # back to the class's forward
            layer.stacked = None
        super().on_calibration_end(state, event, **kwargs)
        self._stop_transfers()  # every write-back lands before oneshot returns (and the save reads)

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        self._stop_transfers()  # also when calibration ended early
        return super().on_finalize(state, **kwargs)

    def _routed(self, layer: ExpertLayer, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.routed_forward == "grouped_mm" and _GROUPED_MM[0]:
            try:
                if layer.stacked is None:
                    with torch.no_grad():
                        layer.stacked = stack_experts(layer.module)
                return grouped_routed_forward(layer.module, layer.stacked, hidden_states, top_k_index,
                                              top_k_weights)
            except (RuntimeError, AttributeError, NotImplementedError):  # no grouped GEMM on this device/torch
                _GROUPED_MM[0] = False
                layer.stacked = None
        return sorted_routed_forward(layer.module, hidden_states, top_k_index, top_k_weights)

    def _hook_for(self, layer: ExpertLayer) -> Any:
        def take_tokens(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            layer.calls += 1 if x.dim() == 2 else x.shape[0]
            x = x.detach().reshape(-1, x.shape[-1])
            layer.pending.append(x)
            layer.pending_tokens += x.shape[0]
            if layer.pending_tokens >= self.token_chunk:
                self._flush(layer)

        return take_tokens

    def _flush(self, layer: ExpertLayer) -> None:
        """The all-experts pass over the buffered tokens: shared gate/up Hessian, per-expert down Hessians."""
        if not layer.pending:
            return
        t0 = time.perf_counter()
        x = torch.cat(layer.pending) if len(layer.pending) > 1 else layer.pending[0]
        layer.pending, layer.pending_tokens = [], 0
        with torch.no_grad():
            self._allocate(layer, x.device)
            add_gram(layer.gate_up, x, self.hessian_inputs)
            for slot, e in enumerate(layer.owned):
                expert = layer.experts[e]
                a = expert._apply_gate(torch.cat([expert.gate_proj(x), expert.up_proj(x)], dim=-1))
                add_gram(layer.down[slot], a, self.hessian_inputs)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self._timings["hessian_pass_s"] = self._timings.get("hessian_pass_s", 0.0) + time.perf_counter() - t0

    def _share(self) -> tuple[int, int]:
        return self.expert_share or _rank_world()

    def _allocate(self, layer: ExpertLayer, device: torch.device) -> None:
        """The layer's Hessian accumulators, once: a non-owner allocates no down_proj Hessian it will not use
        (4.3 GB of FP32 for all 256 of GLM-5.2's experts)."""
        if layer.gate_up is not None:
            return
        first = layer.experts[0]
        hidden = first.gate_proj.weight.shape[1]
        rows, inter = first.down_proj.weight.shape
        if self.expert_share is None:  # every expert's Hessian is formed here
            layer.down_owners = [0] * len(layer.experts)
            layer.owned = list(range(len(layer.experts)))
        else:
            rank, world = self.expert_share
            batch = down_batch(self.batched_quantization, self.solve_rows, rows)
            layer.down_owners = batch_owners(len(layer.experts), batch, world)
            layer.owned = [e for e, o in enumerate(layer.down_owners) if o == rank]
        layer.gate_up = torch.zeros(hidden, hidden, device=device, dtype=GPTQ_PRECISION)
        layer.down = torch.zeros(len(layer.owned), inter, inter, device=device, dtype=GPTQ_PRECISION)

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module],
                                **kwargs: Any) -> None:
        if self._transfers is not None:
            self._transfers.drain()  # the previous layer's write-backs: done, their GPU sources freed
        present = set(modules)
        here = [layer for layer in self._layers if layer.module in present]
        for layer in self._layers:
            layer.stacked = None  # this layer's weights are about to change; earlier layers are done
        for layer in here:
            self._flush(layer)
            self._allocate(layer, get_execution_device(layer.experts[0].gate_proj))
            # down_proj: llm-compressor's own (batched, distributed-aware) solve, fed our Hessians
            calls = torch.tensor(float(layer.calls), device=layer.down.device)
            layer.down.mul_(2)  # llm-compressor accumulates (√2·x)(√2·x)ᵀ
            for slot, e in enumerate(layer.owned):  # the others' (expert split): their owner solves them
                self._hessians[layer.experts[e].down_proj] = layer.down[slot]
                self._num_samples[layer.experts[e].down_proj] = calls.clone()
            layer.down = None
        if here and self.batched_quantization == "auto":
            rows = here[0].experts[0].down_proj.weight.shape[0]
            self.batched_quantization = down_batch("auto", self.solve_rows, rows)
        t0 = time.perf_counter()
        super().on_sequential_epoch_end(state, event, modules, **kwargs)  # observe weights, solve down_proj
        gate_up_owners = {layer.name: self._solve_gate_up(layer) for layer in here}
        self._timings["solve_s"] = self._timings.get("solve_s", 0.0) + time.perf_counter() - t0
        if self.expert_share is not None and self.expert_share[1] > 1 and dist.is_initialized():
            t0 = time.perf_counter()
            for layer in here:
                owner = dict(gate_up_owners[layer.name])
                for expert, rank in zip(layer.experts, layer.down_owners, strict=True):
                    owner[expert.down_proj] = rank
                # skip_cpu=False: on the CPU (gloo ranks) nothing is shared between the ranks' copies
                broadcast_qparams_and_cleanup(list(layer.linears()), owner, _GPTQ_Q_PARAMS, skip_cpu=False)
            self._timings["broadcast_s"] = self._timings.get("broadcast_s", 0.0) + time.perf_counter() - t0

    def _solve_gate_up(self, layer: ExpertLayer) -> dict[torch.nn.Module, int]:
        """Solves this rank's gate/up rows against the shared Hessian; returns each module's owner."""
        import llmcompressor.modifiers.gptq.base as gptq_base  # its CompressionLogger may be patched

        calls = torch.tensor(float(layer.calls), device=layer.gate_up.device)
        if is_distributed() and self.expert_share is None:  # data parallel: each rank saw its own samples
            dist.all_reduce(layer.gate_up)
            dist.all_reduce(calls)
        hessian = layer.gate_up.mul_(2) / calls
        layer.gate_up = None
        first = layer.experts[0].gate_proj
        quant_args = getattr_chain(first, "quantization_scheme.weights")
        hinv, perm, dead, g_idx, fallback = factor_shared(hessian, quant_args, self.dampening_frac)
        del hessian
        rank, world = self._share()
        n_exp = len(layer.experts)
        rows = first.weight.shape[0]
        step = rows_batch(self.solve_rows, rows)
        all_mods = [m for e in layer.experts for m in (e.gate_proj, e.up_proj)]
        if self.expert_share is not None:  # whole batches of one process: the same members, the same bits
            owner = dict(zip(all_mods, batch_owners(len(all_mods), step, world), strict=True))
        else:
            owner = {m: k // 2 * world // n_exp for k, m in enumerate(all_mods)}
        mine = [m for m in all_mods if owner[m] == rank]
        for i in range(0, len(mine), step):
            batch = mine[i:i + step]
            qparams = [m.weight_observer.get_qparams() for m in batch]
            with torch.no_grad():
                w = torch.stack([m.weight for m in batch]).to(GPTQ_PRECISION).reshape(-1, hinv.shape[0])
                scale = torch.stack([q["scale"] for q in qparams])
                zp = torch.stack([q["zero_point"] for q in qparams])
                with contextlib.ExitStack() as stack:
                    loggers = [stack.enter_context(gptq_base.CompressionLogger(m)) for m in batch]
                    q, row_loss = shared_hessian_solve(
                        w, hinv, perm, dead, scale.reshape(w.shape[0], -1), zp.reshape(w.shape[0], -1),
                        g_idx, quant_args, self.block_size)
                    for lg, loss in zip(loggers, row_loss.view(len(batch), rows).sum(dim=1).tolist(), strict=True):
                        lg.set_results(name="GPTQ", loss=loss)
                update_batch_qparams(batch, q.view(len(batch), rows, -1), scale, zp, None, quant_args)
            if fallback:
                self._rtn_fallback_module_names += [self._module_names[m] for m in batch]
            self._num_compressed_modules += len(batch)
        if is_distributed() and self.expert_share is None:
            broadcast_qparams_and_cleanup(all_mods, owner, _GPTQ_Q_PARAMS)
        return owner

    @property
    def timings(self) -> dict[str, float]:
        return dict(self._timings)
