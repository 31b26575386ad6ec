"""DeepSeek-V3 / V3.1 / R1 (`deepseek_v3`): MLA attention, MoE with a grouped sigmoid router, MTP layer(s)
index-stored at model.layers.{num_hidden_layers + i} (vLLM: deepseek_mtp)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtpquant.model.families.base import MTP_EXTRA_BASE, Family, deepseek_dims

if TYPE_CHECKING:
    from mtpquant.model.recipes import FixtureSpec


def tiny_config(spec: FixtureSpec, num_layers: int) -> Any:
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **deepseek_dims(spec, num_layers), num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
        kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, head_dim=32,
        n_group=1, topk_group=1,
    )


class DeepseekV3Family(Family):
    def mtp_extra_shape(self, name: str, hidden: int, vocab: int) -> tuple[int, ...]:
        return (vocab, hidden) if name == "embed_tokens.weight" else super().mtp_extra_shape(name, hidden, vocab)


# Each MTP layer of the real checkpoints also carries its own embed_tokens and shared_head.head.
FAMILY = DeepseekV3Family("deepseek_v3", "DeepseekV3ForCausalLM",
                          MTP_EXTRA_BASE + ("shared_head.head.weight", "embed_tokens.weight"),
                          vllm_method="deepseek_mtp", tiny_config=tiny_config)
