"""A decoder layer with its real weights: the on-disk per-expert tensors fused as transformers holds them, moved to
the device once, the experts linearized with llm-compressor's classes; the model skeleton on the meta device.
"""

from __future__ import annotations

from typing import Any

from mtpquant.calib.stream.reader import layer_names, read_tensors
from mtpquant.core.checkpoint import Checkpoint
from mtpquant.core.errors import MtpquantError
from mtpquant.model.families.base import layer_prefix

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
