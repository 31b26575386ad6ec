"""GLM-5 / GLM-5.2 (`glm_moe_dsa`): MLA attention with the DSA sparse-attention indexer, MoE, MTP layer(s)
index-stored at model.layers.{num_hidden_layers + i}."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtpquant.model.families.base import MTP_EXTRA_BASE, Family, deepseek_dims

if TYPE_CHECKING:
    from mtpquant.model.recipes import FixtureSpec


def tiny_config(spec: FixtureSpec, num_layers: int) -> Any:
    from transformers import GlmMoeDsaConfig

    return GlmMoeDsaConfig(
        **deepseek_dims(spec, num_layers), num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
        kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, head_dim=32,
        index_topk=64, index_head_dim=64, index_n_heads=2,
    )


FAMILY = Family("glm_moe_dsa", "GlmMoeDsaForCausalLM", MTP_EXTRA_BASE, vllm_method="deepseek_mtp",
                tiny_config=tiny_config, has_indexer=True)
