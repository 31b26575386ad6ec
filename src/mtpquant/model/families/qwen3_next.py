"""Qwen3-Next (`qwen3_next`): hybrid Gated-DeltaNet / gated full attention, MoE with one gated shared expert
and a softmax router, MTP layer(s) under the `mtp.` prefix (`mtp.fc`, `mtp.pre_fc_norm_*`, `mtp.norm`, the
decoder blocks at `mtp.layers.{i}`; vLLM: qwen3_next_mtp)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtpquant.model.families.base import FIXTURE_VOCAB, Family

if TYPE_CHECKING:
    from mtpquant.model.recipes import FixtureSpec

FULL_ATTENTION_INTERVAL = 2  # every 2nd layer is full attention (the real model: every 4th)


class Qwen3NextFamily(Family):
    def moe_layers(self, config: dict[str, Any]) -> list[int]:
        n, step = self.num_layers(config), int(config.get("decoder_sparse_step", 1))
        dense = set(config.get("mlp_only_layers") or [])
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0 and self.num_experts(config) > 0]

    def classify_in_layer(self, rest: str) -> str:
        return "attention" if rest.startswith("linear_attn.") else super().classify_in_layer(rest)

    def num_shared_experts(self, config: dict[str, Any]) -> int:
        return 1 if config.get("shared_expert_intermediate_size") else 0

    def dense_prefix(self, k: int) -> dict[str, Any]:
        return {"mlp_only_layers": list(range(k))}


def tiny_config(spec: FixtureSpec, num_layers: int) -> Any:
    from transformers import Qwen3NextConfig

    # layers past the spec's decoder layers are the fixture's MTP blocks: full attention, as in the real model
    kinds = ["full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 or i >= spec.num_hidden_layers
             else "linear_attention" for i in range(num_layers)]
    return Qwen3NextConfig(
        vocab_size=FIXTURE_VOCAB, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
        linear_num_value_heads=4, moe_intermediate_size=spec.moe_intermediate_size,
        shared_expert_intermediate_size=spec.moe_intermediate_size, num_experts=spec.n_routed_experts,
        num_experts_per_tok=spec.num_experts_per_tok, mlp_only_layers=list(range(spec.first_k_dense_replace)),
        layer_types=kinds, max_position_embeddings=4096, bos_token_id=None, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=False, dtype="bfloat16",
    )


FAMILY = Qwen3NextFamily(
    "qwen3_next", "Qwen3NextForCausalLM",
    ("fc.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight"),
    vllm_method="qwen3_next_mtp", tiny_config=tiny_config, experts_key="num_experts", mtp_prefix="mtp.",
    shared_expert="mlp.shared_expert", fp32_suffixes=(),
)
