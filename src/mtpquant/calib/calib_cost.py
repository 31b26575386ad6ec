"""What calibrating a MoE model costs: FLOPs, bytes and memory, counted from its dimensions.

Shared by `mtpquant plan` (predictions) and benchmarks/calib_speed.py (achieved rates against the floor).
Counts are per MoE decoder layer and per calibration token unless a name says otherwise; a multiply-add
is 2 FLOPs. "baseline" is llm-compressor's default GPTQ with every expert calibrated (FP32 Hessian per
Linear, all experts run on every token in both the calibration and the propagation pass); "fast" is
mtpquant.calib.expert_gptq (one gate/up Hessian per layer, bf16 operands, routed-only forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtpquant.model.schemes import PackedIntScheme

BF16, FP32 = 2, 4


@dataclass(frozen=True)
class MoEShape:
    hidden: int
    moe_inter: int
    experts: int
    top_k: int
    shared_experts: int
    moe_layers: int
    dense_layers: int
    dense_inter: int
    attn_params: int  # per decoder layer: attention incl. indexer, norms (everything but the MLP)
    embed_params: int  # embeddings + lm_head + final norm
    vocab: int
    mtp_layers: int = 0

    # ---- parameters and bytes ----------------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_inter

    @property
    def moe_layer_params(self) -> int:
        router = self.experts * self.hidden
        return (self.attn_params + self.experts * self.expert_params + router
                + self.shared_experts * self.expert_params)

    @property
    def dense_layer_params(self) -> int:
        return self.attn_params + 3 * self.hidden * self.dense_inter

    @property
    def total_params(self) -> int:
        return (self.moe_layers * self.moe_layer_params + self.dense_layers * self.dense_layer_params
                + self.embed_params)

    def bf16_bytes(self, with_mtp: bool = True) -> int:
        mtp = self.mtp_layers * (self.moe_layer_params + 2 * self.hidden * self.hidden) if with_mtp else 0
        return BF16 * (self.total_params + mtp)

    def quantized_bytes(self, scheme: PackedIntScheme) -> int:
        """Output checkpoint: routed experts at the scheme's bytes per weight (packed values, scales, zero
        points), the rest BF16, the MTP layer(s) BF16."""
        expert = self.moe_layers * self.experts * self.expert_params
        return int(expert * scheme.bytes_per_weight) + self.bf16_bytes() - BF16 * expert

    # ---- FLOPs per token per MoE layer --------------------------------------------------------------
    def attn_flops(self) -> float:
        return 2.0 * self.attn_params  # projections; attention scores are small at these lengths

    def routed_flops(self) -> float:
        return 2.0 * (self.top_k + self.shared_experts) * self.expert_params

    def fast_calib_flops(self) -> dict[str, float]:
        h, i, e = self.hidden, self.moe_inter, self.experts
        return {
            "all_experts_gate_up": 4.0 * e * h * i,  # bf16 GEMMs: the down_proj inputs of every expert
            "down_hessians": 2.0 * e * i * i,  # bf16 operands, FP32 sums
            "shared_gate_up_hessian": 2.0 * h * h,
            "routed_forward_x2": 2 * (self.routed_flops() + self.attn_flops()),  # calibration + propagation
        }

    def baseline_calib_flops(self) -> dict[str, float]:
        h, i, e = self.hidden, self.moe_inter, self.experts
        return {
            "all_experts_forward_x2": 2 * 6.0 * e * h * i,  # calibration + propagation pass, all experts
            "hessians_fp32": 2.0 * e * (2 * h * h + i * i),  # one FP32 XᵀX per Linear
            "other_forward_x2": 2 * (2.0 * self.shared_experts * self.expert_params + self.attn_flops()),
        }

    # ---- solve FLOPs per MoE layer (independent of tokens) -----------------------------------------
    def solve_flops(self, fast: bool) -> dict[str, float]:
        h, i, e = self.hidden, self.moe_inter, self.experts
        fact = 5.0 / 3.0  # Cholesky + Cholesky inverse + Cholesky of the inverse, × K³
        gate_up_factors = 1 if fast else 2 * e
        return {
            "factorizations": fact * (gate_up_factors * h**3 + e * i**3),
            "block_updates": 2.0 * e * i * h * h + e * h * i * i,
        }

    # ---- memory of one MoE layer on the GPU --------------------------------------------------------
    def hessian_bytes(self, fast: bool) -> int:
        h, i, e = self.hidden, self.moe_inter, self.experts
        return FP32 * ((h * h if fast else 2 * e * h * h) + e * i * i)


def shape_from_config(config: dict[str, Any]) -> MoEShape:
    """Dimensions of an MoE model from its config.json (the family reads it); per-layer parameter counts from a
    model built on the meta device (no memory), so attention and indexer sizes are exact."""
    import torch
    import transformers

    from mtpquant.model.families import LAYERS, family_for, layer_prefix

    fam = family_for(config)
    cfg_cls = transformers.AutoConfig.for_model(fam.model_type).__class__
    cfg = cfg_cls(**fam.two_layer_config(config))
    with torch.device("meta"):
        model = getattr(transformers, fam.architecture)(cfg)
    first = layer_prefix(0)
    attn = sum(p.numel() for n, p in model.named_parameters() if n.startswith(first) and ".mlp." not in n)
    embed = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(LAYERS))
    return MoEShape(attn_params=attn, embed_params=embed, **fam.dims(config))
