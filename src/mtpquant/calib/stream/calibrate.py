"""One decoder layer through llm-compressor's lifecycle as its SequentialPipeline runs one subgraph (calibration
pass, solve, propagation pass), then packed by compressed-tensors.
"""

from __future__ import annotations

import contextlib
from typing import Any

from mtpquant.calib.quantize import (
    modifier_for,
    oneshot_options,
    recording_gptq,
    routing_counts,
)
from mtpquant.calib.stream.device import Placement, Spans, move_to
from mtpquant.calib.stream.journal import kill_point
from mtpquant.model.families.base import layer_prefix
from mtpquant.model.recipes import QuantRecipe


def _split_output(out: Any) -> tuple[Any, Any]:
    """(hidden states, what the next layer gets as prev_topk_indices): GLM-5's layers return both."""
    if isinstance(out, tuple):
        return out[0], out[1] if len(out) > 1 else None
    return out, None


def _call(layer: Any, hidden: Any, kwargs: dict[str, Any], prev: Any, device: Any, place: Placement) -> Any:
    """The layer on its execution device; what it returns goes where activations wait between layers (on a
    CPU-only machine every move is a no-op)."""
    if "prev_topk_indices" in kwargs:
        kwargs = {**kwargs, "prev_topk_indices": prev}
    return place.put(layer(move_to(hidden, device), **move_to(kwargs, device)))


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
                    config_dict: dict[str, Any], device: Any, place: Placement,
                    share: tuple[int, int] | None = None, spans: dict[str, float] | None = None,
                    gpu: dict[str, float] | None = None) -> tuple[list[Any], list[Any], list[Any], Any, dict]:
    """One subgraph of llm-compressor's SequentialPipeline for decoder layer i: calibration pass, solve,
    propagation pass through the quantized layer. `share`: (rank, world) of the expert split; `spans` gets
    each phase's seconds (the GPU synchronized at its end), `gpu` the GPU's peak GiB so far at its end.
    Returns (hidden out, topk out, the GPTQ rows this process solved, routing counts, modifier fields the solve
    resolved)."""
    span = Spans(spans, device, gpu)
    from llmcompressor.core import LifecycleCallbacks, active_session
    from llmcompressor.modeling.moe.context import moe_calibration_context
    from llmcompressor.modeling.offset_norm import norm_calibration_context
    from llmcompressor.modifiers.utils.hooks import HooksMixin
    from llmcompressor.utils.helpers import DisableQuantization, calibration_forward_context

    skeleton.model.layers[i] = layer
    if not any(n.startswith(layer_prefix(i)) for n in fam.routed_expert_linears(config_dict)):
        # nothing to quantize here (a dense layer): the pipeline's two passes give the same outputs
        kill_point("calibrate", i)
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
                    kill_point("calibrate", i)
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
