"""Model-family knowledge, in one place: where the MTP layers live, which Linears are routed experts,
and what must stay in BF16 (everything else: attention incl. the indexer, dense prefix layers, shared
experts, router, embeddings, lm_head, and the MTP layers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mtpquant.errors import MtpquantError

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
# Parts of an MTP layer that a plain decoder layer does not have (vLLM's *_mtp.py loaders read these).
MTP_EXTRA_BASE = ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    mtp_extra: tuple[str, ...]  # MTP-only tensors, relative to model.layers.{L}.
    has_indexer: bool

    # ---- config accessors -------------------------------------------------------------------------
    def cfg(self, config: dict[str, Any], key: str) -> Any:
        if key not in config:
            raise MtpquantError(f"config.json: field '{key}' is missing (needed for {self.model_type})")
        return config[key]

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(self.cfg(config, "num_hidden_layers"))

    def num_mtp(self, config: dict[str, Any]) -> int:
        return int(config.get("num_nextn_predict_layers", 0))

    def num_experts(self, config: dict[str, Any]) -> int:
        return int(self.cfg(config, "n_routed_experts"))

    def mtp_layers(self, config: dict[str, Any]) -> list[int]:
        n = self.num_layers(config)
        return list(range(n, n + self.num_mtp(config)))

    def moe_layers(self, config: dict[str, Any]) -> list[int]:
        """Decoder layers (MTP excluded) whose MLP is the routed-expert MoE block."""
        n = self.num_layers(config)
        types = config.get("mlp_layer_types")
        if types:
            return [i for i, t in enumerate(types[:n]) if t == "sparse"]
        return list(range(int(config.get("first_k_dense_replace", 0)), n))

    # ---- names ----------------------------------------------------------------------------------------
    def routed_expert_linears(self, config: dict[str, Any]) -> list[str]:
        """Every routed-expert Linear that must be quantized, MTP excluded: MoE layers x experts x 3."""
        e = self.num_experts(config)
        return [f"model.layers.{layer}.mlp.experts.{i}.{p}"
                for layer in self.moe_layers(config) for i in range(e) for p in EXPERT_PROJS]

    def routed_experts_target(self, config: dict[str, Any]) -> str:
        """An llm-compressor target regex that matches routed experts and can never match an MTP layer.

        A bare `.*mlp\\.experts\\..*` would also match model.layers.{L}.mlp.experts (the MTP layer's own
        MoE) if that layer were ever instantiated, and compressed-tensors has been seen to quantize an
        ignored MTP layer at save time; so the MTP layer indices are excluded in the pattern itself.
        """
        mtp = self.mtp_layers(config)
        guard = f"(?!(?:{'|'.join(map(str, mtp))})\\.)" if mtp else ""
        return f"re:^model\\.layers\\.{guard}\\d+\\.mlp\\.experts\\.\\d+\\.(?:gate|up|down)_proj$"

    def mtp_ignore(self, config: dict[str, Any]) -> list[str]:
        """quantization_config.ignore entries that keep the MTP layers out of quantization in vLLM."""
        return [f"re:^model\\.layers\\.{layer}\\..*" for layer in self.mtp_layers(config)]

    def mtp_prefixes(self, config: dict[str, Any]) -> list[str]:
        return [f"model.layers.{layer}." for layer in self.mtp_layers(config)]

    def classify(self, name: str, config: dict[str, Any]) -> str:
        """Category of a tensor or module name; only 'routed_expert' may be quantized."""
        if name.startswith("lm_head"):
            return "lm_head"
        if name.startswith("model.embed_tokens"):
            return "embedding"
        if name.startswith("model.norm"):
            return "norm"
        m = _LAYER.match(name)
        if not m:
            return "other"
        layer, rest = int(m.group(1)), m.group(2)
        if layer in self.mtp_layers(config):
            return "mtp"
        if layer >= self.num_layers(config):
            return "beyond_config"
        if rest.startswith("self_attn.indexer."):
            return "indexer"
        if rest.startswith("self_attn."):
            return "attention"
        if rest.startswith("mlp.experts."):
            return "routed_expert"
        if rest.startswith("mlp.shared_experts."):
            return "shared_expert"
        if rest.startswith("mlp.gate."):
            return "router"
        if rest.startswith("mlp."):
            return "dense_mlp"
        return "norm"


FAMILIES: dict[str, Family] = {
    "glm_moe_dsa": Family("glm_moe_dsa", "GlmMoeDsaForCausalLM", MTP_EXTRA_BASE, has_indexer=True),
    "glm4_moe": Family("glm4_moe", "Glm4MoeForCausalLM", MTP_EXTRA_BASE + ("shared_head.head.weight",),
                       has_indexer=False),
}


def family_for(config: dict[str, Any], where: str = "config.json") -> Family:
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise MtpquantError(f"{where}: model_type {mt!r} is not supported (known: {', '.join(FAMILIES)})")
    return FAMILIES[mt]


def matches(pattern: str, name: str) -> bool:
    """compressed-tensors' matching rule for targets/ignore: 're:' regex (re.match) or exact name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name
