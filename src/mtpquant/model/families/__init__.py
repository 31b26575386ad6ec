"""Model families, registered in one place: each family is one small module (its config keys, layer kinds,
MTP layout, tensor names, vLLM MTP method and tiny-config factory); this registry is the only list of them.
Adding a family: a module here, one line in FAMILIES, a model recipe."""

from __future__ import annotations

from typing import Any

from mtpquant.core.errors import MtpquantError
from mtpquant.model.families import deepseek_v3, glm4_moe, glm_moe_dsa, qwen3_next
from mtpquant.model.families.base import EXPERT_PROJS, KEEP_BF16, LAYERS, MTP_EXTRA_BASE, Family, layer_prefix, matches

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    glm_moe_dsa.FAMILY,
    glm4_moe.FAMILY,
    deepseek_v3.FAMILY,
    qwen3_next.FAMILY,
)}

__all__ = ["EXPERT_PROJS", "FAMILIES", "KEEP_BF16", "LAYERS", "MTP_EXTRA_BASE", "Family", "family_for", "layer_prefix",
           "matches", "model_type_of"]


def model_type_of(config: dict[str, Any]) -> Any:
    """A config's `model_type` (what picks its family; None where it has none)."""
    return config.get("model_type")


def family_for(config: dict[str, Any], where: str = "config.json") -> Family:
    mt = model_type_of(config)
    if mt not in FAMILIES:
        raise MtpquantError(f"{where}: model_type {mt!r} is not supported (known: {', '.join(FAMILIES)})")
    return FAMILIES[mt]
