import json
import resource

import pytest

from mtpquant.calib.quantize import quantize
from mtpquant.core.checkpoint import Checkpoint
from mtpquant.core.errors import MtpquantError
from mtpquant.model.families import FAMILIES, layer_prefix
from mtpquant.model.recipes import RECIPES_DIR


def test_real_gptq_packs_every_routed_expert(built, family):
    q = Checkpoint(built[family]["quantized"])
    cfg, t = q.config, q.tensors
    h, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    experts = FAMILIES[family].routed_expert_linears(cfg)
    assert len(experts) == 2 * 8 * 3
    for mod in experts:
        n, k = (h, inter) if mod.endswith("down_proj") else (inter, h)
        assert t[f"{mod}.weight_packed"].dtype == "I32" and t[f"{mod}.weight_packed"].shape == (n, k // 8)
        assert t[f"{mod}.weight_scale"].shape == (n, k // 128)
        assert t[f"{mod}.weight_zero_point"].dtype == "I32"  # asymmetric: zero points are stored
        assert t[f"{mod}.weight_zero_point"].shape == (n // 8, k // 128)
        assert f"{mod}.weight" not in t
    qc = cfg["quantization_config"]
    assert qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"]) == (4, 128, False)
    # attention, shared experts, router, embeddings and lm_head stay unquantized
    fam = FAMILIES[family]
    moe, dense = fam.moe_layers(cfg)[0], fam.dense_layers(cfg)[0]
    for name in (f"{layer_prefix(moe)}{fam.shared_expert}.gate_proj.weight",
                 f"{layer_prefix(dense)}mlp.gate_proj.weight", f"{fam.router_module(moe)}.weight",
                 "model.embed_tokens.weight", "lm_head.weight"):
        assert t[name].dtype == "BF16"
    assert t[f"{fam.router_module(moe)}.{fam.fp32_suffixes[0]}"].dtype == "F32"
    # the MTP layer is dropped by from_pretrained: that is what inject-mtp repairs
    assert fam.mtp_prefixes(cfg) and not any(n.startswith(tuple(fam.mtp_prefixes(cfg))) for n in t)


def test_report(built, family):
    rep = json.loads(built[family]["quantize_report"].read_text())
    assert rep["quantized_linears"] == rep["expected_linears"] == 48
    assert len(rep["per_linear"]) == 48
    assert all(r["loss"] is not None and r["loss"] >= 0 for r in rep["per_linear"])
    assert rep["calibration"]["samples"] == 16 and rep["calibration"]["tokens"] > 0
    assert set(rep["routing_counts"]) == {"1", "2"}
    # the peak RSS of this process (quantize ran in it) when quantize ended, in GiB: at most the peak now, at
    # least the BF16 model it held
    base_gib = sum(p.stat().st_size for p in built[family]["base"].glob("*.safetensors")) / 2**30
    now_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert base_gib <= rep["memory"]["host_peak_rss_gb"] <= now_gib + 1e-3  # (rounded to 3 decimals)
    assert isinstance(rep["few_token_experts"], list)
    assert "(?!(?:3)\\.)" in rep["recipe"]["targets"][0], "the target regex must exclude the MTP layer"


def recipe_with_targets(tmp_path, targets: str):
    text = (RECIPES_DIR / "quant" / "w4a16-asym-g128.yaml").read_text()
    p = tmp_path / "r.yaml"
    p.write_text(text.replace("targets: [routed_experts]", f"targets: [{targets}]"))
    return p


@pytest.mark.parametrize("targets,hit", [
    ("'re:.*self_attn\\.o_proj$'", "model.layers.0.self_attn.o_proj (attention)"),
    ("'re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$'", "model.layers.3.mlp.experts."),
    ("'re:.*shared_experts.*'", "(shared_expert)"),
])
def test_refuses_targets_beyond_routed_experts(built, tmp_path, targets, hit):
    with pytest.raises(MtpquantError) as exc:
        quantize(built["glm_moe_dsa"]["base"], recipe_with_targets(tmp_path, targets), "tiny-local",
                 tmp_path / "out")
    assert hit in str(exc.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,refused", [("glm_moe_dsa", True), ("glm4_moe", False)])
def test_per_linear_sequential_targets_refused_where_the_indexer_cannot_trace(built, tmp_path, family, refused):
    from mtpquant.calib.quantize import refuse_untraceable_sequential_targets
    from mtpquant.model import recipes

    text = (RECIPES_DIR / "quant" / "w4a16-asym-g128.yaml").read_text()
    p = tmp_path / "r.yaml"
    p.write_text(text.replace("sequential_targets: null", "sequential_targets: [Linear]"))
    recipe = recipes.load("quant", p)
    if not refused:
        refuse_untraceable_sequential_targets(recipe, FAMILIES[family], str(p))
        return
    with pytest.raises(MtpquantError, match=r"r\.yaml: sequential_targets: 'Linear' splits the decoder layer"):
        quantize(built[family]["base"], p, "tiny-local", tmp_path / "out")
    assert not (tmp_path / "out").exists()
