"""What a model family is: its config keys, which decoder layers are dense / MoE / MTP, where the MTP layers
live on disk, the names of routed experts, router and shared experts, what must stay BF16, vLLM's MTP
method, and a tiny-config factory for fixtures. Only the family objects read model config keys.

Two MTP layouts exist: index-stored (`model.layers.{num_hidden_layers + i}.*`, GLM and DeepSeek) and
prefixed (everything under one prefix such as `mtp.`, the decoder blocks at `mtp.layers.{i}.`, Qwen3-Next).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mtpquant.core.errors import MtpquantError

if TYPE_CHECKING:
    from mtpquant.model.recipes import FixtureSpec

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
# Parts of a DeepSeek-style MTP layer that a plain decoder layer does not have (vLLM's *_mtp.py loaders read these).
MTP_EXTRA_BASE = ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight")
# Tensor categories (Family.classify) that stay in BF16: everything but the routed experts.
KEEP_BF16 = ("attention", "indexer", "dense_mlp", "shared_expert", "router", "embedding", "lm_head", "norm", "mtp")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
LAYERS = "model.layers."
FIXTURE_VOCAB = 320  # the fixtures' byte tokenizer: 256 bytes + specials, padded to a multiple of 64


def layer_prefix(i: int) -> str:
    """On-disk prefix of decoder layer i (the same in every family)."""
    return f"{LAYERS}{i}."


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    mtp_extra: tuple[str, ...]  # MTP-only tensors, relative to each MTP prefix (mtp_prefixes)
    # vLLM's MTP draft model type for this family (vLLM derives it from the target's config; the launcher passes
    # the generic `mtp` method, see mtpquant.serving.serve.speculative_config)
    vllm_method: str
    tiny_config: Callable[[FixtureSpec, int], Any]  # (spec, decoder layers) -> a transformers config
    has_indexer: bool = False
    layers_key: str = "num_hidden_layers"
    experts_key: str = "n_routed_experts"
    mtp_key: str = "num_nextn_predict_layers"
    mtp_prefix: str | None = None  # None: MTP layer i is stored as model.layers.{layers + i}
    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    shared_expert: str = "mlp.shared_experts"
    fp32_suffixes: tuple[str, ...] = ("e_score_correction_bias",)  # stored FP32 beside BF16 weights

    # ---- config accessors -------------------------------------------------------------------------
    def cfg(self, config: dict[str, Any], key: str) -> Any:
        if key not in config:
            raise MtpquantError(f"config.json: field '{key}' is missing (needed for {self.model_type})")
        return config[key]

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(self.cfg(config, self.layers_key))

    def num_mtp(self, config: dict[str, Any]) -> int:
        return int(config.get(self.mtp_key, 0) or 0)

    def num_experts(self, config: dict[str, Any]) -> int:
        return int(self.cfg(config, self.experts_key))

    def num_shared_experts(self, config: dict[str, Any]) -> int:
        return int(config.get("n_shared_experts", 0) or 0)

    def hidden_size(self, config: dict[str, Any]) -> int:
        return int(self.cfg(config, "hidden_size"))

    def experts_per_token(self, config: dict[str, Any], default: int | None = None) -> int:
        """Routed experts per token (top-k); `default` where the config has none (None: an error)."""
        if default is not None and "num_experts_per_tok" not in config:
            return default
        return int(self.cfg(config, "num_experts_per_tok"))

    def attention_heads(self, config: dict[str, Any], default: int | None = None) -> int:
        """Attention heads; `default` where the config has none (None: an error)."""
        if default is not None and "num_attention_heads" not in config:
            return default
        return int(self.cfg(config, "num_attention_heads"))

    def dims(self, config: dict[str, Any]) -> dict[str, int]:
        """The dimensions the cost model needs, by neutral names."""
        moe = len(self.moe_layers(config))
        def get(key: str) -> int:
            return int(self.cfg(config, key))

        return dict(hidden=self.hidden_size(config), moe_inter=get("moe_intermediate_size"),
                    experts=self.num_experts(config), top_k=self.experts_per_token(config),
                    shared_experts=self.num_shared_experts(config), moe_layers=moe,
                    dense_layers=self.num_layers(config) - moe, dense_inter=get("intermediate_size"),
                    vocab=get("vocab_size"), mtp_layers=self.num_mtp(config))

    def two_layer_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` cut to one dense and one MoE layer with one expert (per-layer parameter counts)."""
        small = {k: v for k, v in config.items() if k not in ("architectures", "quantization_config")}
        for k in ("layer_types", "indexer_types", "mlp_layer_types"):
            small.pop(k, None)
        return {**small, self.layers_key: 2, self.experts_key: 1, **self.dense_prefix(1)}

    def dense_prefix(self, k: int) -> dict[str, Any]:
        """Config fields that make the first k decoder layers dense."""
        return {"first_k_dense_replace": k}

    def match_keys(self) -> tuple[str, ...]:
        """config.json fields a quantized checkpoint must share with its base."""
        return ("model_type", self.layers_key, "hidden_size", self.experts_key, "vocab_size")

    def config_from(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A config.json dict of this family from config fields (a model recipe's `config` section)."""
        return {"model_type": self.model_type, **fields}

    def with_mtp(self, config: dict[str, Any], n: int) -> dict[str, Any]:
        """`config` declaring n MTP layers."""
        return {**config, self.mtp_key: n}

    # ---- layers -----------------------------------------------------------------------------------
    def moe_layers(self, config: dict[str, Any]) -> list[int]:
        """Decoder layers (MTP excluded) whose MLP is the routed-expert MoE block."""
        n = self.num_layers(config)
        types = config.get("mlp_layer_types")
        if types:
            return [i for i, t in enumerate(types[:n]) if t == "sparse"]
        return list(range(int(config.get("first_k_dense_replace", 0)), n))

    def dense_layers(self, config: dict[str, Any]) -> list[int]:
        moe = set(self.moe_layers(config))
        return [i for i in range(self.num_layers(config)) if i not in moe]

    def mtp_layers(self, config: dict[str, Any]) -> list[int]:
        """MTP layer indices: model.layers.{i} (index layout) or {mtp_prefix}layers.{i} (prefixed)."""
        start = 0 if self.mtp_prefix else self.num_layers(config)
        return list(range(start, start + self.num_mtp(config)))

    def mtp_block(self, config: dict[str, Any], i: int) -> str:
        """Prefix of the decoder block of the i-th MTP layer (0-based)."""
        if self.mtp_prefix:
            return f"{self.mtp_prefix}layers.{i}."
        return layer_prefix(self.num_layers(config) + i)

    def mtp_prefixes(self, config: dict[str, Any]) -> list[str]:
        """Prefixes under which all MTP tensors live; each holds the mtp_extra tensors. [] without MTP."""
        if not self.num_mtp(config):
            return []
        if self.mtp_prefix:
            return [self.mtp_prefix]
        return [layer_prefix(layer) for layer in self.mtp_layers(config)]

    def mtp_ignore(self, config: dict[str, Any]) -> list[str]:
        """quantization_config.ignore entries that keep the MTP layers out of quantization in vLLM."""
        return [f"re:^{re.escape(p)}.*" for p in self.mtp_prefixes(config)]

    # ---- names ------------------------------------------------------------------------------------
    def router_module(self, layer: int) -> str:
        return f"{layer_prefix(layer)}{self.router}"

    def routed_expert_linears(self, config: dict[str, Any]) -> list[str]:
        """Every routed-expert Linear that must be quantized, MTP excluded: MoE layers x experts x 3."""
        e = self.num_experts(config)
        return [f"{layer_prefix(layer)}{self.experts}.{i}.{p}"
                for layer in self.moe_layers(config) for i in range(e) for p in EXPERT_PROJS]

    def routed_experts_target(self, config: dict[str, Any]) -> str:
        """An llm-compressor target regex that matches routed experts and can never match an MTP layer.

        A bare `.*mlp\\.experts\\..*` would also match model.layers.{L}.mlp.experts (the MTP layer's own
        MoE) if that layer were ever instantiated, and compressed-tensors has been seen to quantize an
        ignored MTP layer at save time; so index-stored MTP layers are excluded in the pattern itself
        (a prefixed MTP layout cannot match the anchored `^model\\.layers\\.`).
        """
        mtp = [] if self.mtp_prefix else self.mtp_layers(config)
        guard = f"(?!(?:{'|'.join(map(str, mtp))})\\.)" if mtp else ""
        experts = re.escape(self.experts)
        return f"re:^model\\.layers\\.{guard}\\d+\\.{experts}\\.\\d+\\.(?:gate|up|down)_proj$"

    def classify(self, name: str, config: dict[str, Any]) -> str:
        """Category of a tensor or module name; only 'routed_expert' may be quantized (KEEP_BF16: the rest)."""
        if name.startswith("lm_head"):
            return "lm_head"
        if name.startswith("model.embed_tokens"):
            return "embedding"
        if name.startswith("model.norm"):
            return "norm"
        if self.mtp_prefix and name.startswith(self.mtp_prefix):
            return "mtp" if self.num_mtp(config) else "beyond_config"
        m = _LAYER.match(name)
        if not m:
            return "other"
        layer, rest = int(m.group(1)), m.group(2)
        if not self.mtp_prefix and layer in self.mtp_layers(config):
            return "mtp"
        if layer >= self.num_layers(config):
            return "beyond_config"
        return self.classify_in_layer(rest)

    def classify_in_layer(self, rest: str) -> str:
        """Category of a name relative to its decoder layer."""
        if rest.startswith("self_attn.indexer."):
            return "indexer"
        if rest.startswith("self_attn."):
            return "attention"
        if rest.startswith(f"{self.experts}."):
            return "routed_expert"
        if rest.startswith(f"{self.shared_expert}"):
            return "shared_expert"
        if rest.startswith(f"{self.router}."):
            return "router"
        if rest.startswith("mlp."):
            return "dense_mlp"
        return "norm"

    # ---- fixtures ---------------------------------------------------------------------------------
    def mtp_extra_shape(self, name: str, hidden: int, vocab: int) -> tuple[int, ...]:
        """Shape of an mtp_extra tensor (norms are (hidden,), the projection from [embedding; hidden])."""
        if "norm" in name:
            return (hidden,)
        if name.endswith("head.weight"):
            return (vocab, hidden)
        return (hidden, 2 * hidden)

    def fixture_config(self, spec: FixtureSpec) -> dict[str, Any]:
        """config.json of a tiny fixture (without version-dependent fields)."""
        config = self.with_mtp(self.tiny_config(spec, spec.num_hidden_layers).to_dict(),
                               spec.num_nextn_predict_layers)
        config["architectures"] = [self.architecture]
        config.pop("transformers_version", None)  # keep the bytes independent of the installed version
        config.pop("_name_or_path", None)
        return config


def matches(pattern: str, name: str) -> bool:
    """compressed-tensors' matching rule for targets/ignore: 're:' regex (re.match) or exact name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def deepseek_dims(spec: FixtureSpec, num_layers: int) -> dict[str, Any]:
    """Tiny dimensions in the DeepSeek-style config vocabulary (GLM-4.5, GLM-5, DeepSeek-V3)."""
    return dict(
        vocab_size=FIXTURE_VOCAB, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        moe_intermediate_size=spec.moe_intermediate_size, num_hidden_layers=num_layers,
        n_routed_experts=spec.n_routed_experts, num_experts_per_tok=spec.num_experts_per_tok,
        n_shared_experts=1, first_k_dense_replace=spec.first_k_dense_replace,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=False, dtype="bfloat16",
    )
