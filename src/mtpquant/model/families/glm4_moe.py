"""GLM-4.5 / 4.6 / 4.7 (`glm4_moe`): GQA attention with biases, MoE, MTP layer(s) index-stored at
model.layers.{num_hidden_layers + i}, each carrying its own shared_head.head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtpquant.model.families.base import MTP_EXTRA_BASE, Family, deepseek_dims

if TYPE_CHECKING:
    from mtpquant.model.recipes import FixtureSpec


def tiny_config(spec: FixtureSpec, num_layers: int) -> Any:
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**deepseek_dims(spec, num_layers), num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, attention_bias=True, partial_rotary_factor=0.5)


FAMILY = Family("glm4_moe", "Glm4MoeForCausalLM", MTP_EXTRA_BASE + ("shared_head.head.weight",),
                vllm_method="glm4_moe_mtp", tiny_config=tiny_config)
