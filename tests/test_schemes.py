"""Quantization schemes (mtpquant.model.schemes): what each owns, and a second scheme (W8A16) through the chain."""

import json
import re
from pathlib import Path

import pytest

from mtpquant.calib.quantize import quantize
from mtpquant.chain.inject_mtp import inject_mtp
from mtpquant.chain.verify import verify
from mtpquant.core.checkpoint import Checkpoint
from mtpquant.core.errors import MtpquantError
from mtpquant.model.families import FAMILIES
from mtpquant.model.recipes import RECIPES_DIR, FixtureSpec
from mtpquant.model.schemes import DEFAULT, SCHEMES, label_of, scheme, scheme_for_config
from mtpquant.tiny.fixture import write_fixture

W8 = SCHEMES["w8a16-asym-g128"]


def test_w4a16_layout_is_compressed_tensors_pack_quantized():
    assert DEFAULT.tensors(256, 512) == {"weight_packed": ("I32", (256, 64)), "weight_scale": ("BF16", (256, 4)),
                                         "weight_zero_point": ("I32", (32, 4)), "weight_shape": ("I64", (2,))}
    assert "weight_zero_point" not in SCHEMES["w4a16-sym-g128"].tensors(256, 512)
    assert W8.tensors(256, 512)["weight_packed"] == ("I32", (256, 128))
    assert W8.tensors(256, 512)["weight_zero_point"] == ("I32", (64, 4))


def test_bytes_per_weight_counts_values_scales_and_zero_points():
    assert DEFAULT.bytes_per_weight == 0.5 + 2 / 128 + 0.5 / 128
    assert SCHEMES["w4a16-sym-g128"].bytes_per_weight == 0.5 + 2 / 128
    assert W8.bytes_per_weight == 1 + 2 / 128 + 1 / 128


def test_unknown_scheme_is_one_line_naming_the_known_ones():
    with pytest.raises(MtpquantError, match="unknown quantization scheme 'w3a16'; known: w4a16-asym-g128") as e:
        scheme("w3a16")
    assert "\n" not in str(e.value)


def test_tiny_artifacts_are_the_default_scheme(built, family):
    art = built[family]["artifact"]
    qc = json.loads((art / "config.json").read_text())["quantization_config"]
    assert scheme_for_config(qc, "config.json") is DEFAULT
    assert label_of(art) == "W4A16"
    assert label_of(built[family]["base"]) == "quantized"  # no quantization_config: no scheme to name


def test_unknown_config_scheme_is_refused(built, family):
    qc = json.loads((built[family]["artifact"] / "config.json").read_text())["quantization_config"]
    qc["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    with pytest.raises(MtpquantError, match="config_groups.group_0 .* is no known scheme"):
        scheme_for_config(qc, "config.json")


def test_w8a16_quantizes_and_verifies(tmp_path):
    """A second scheme is a registry entry: a recipe naming it goes through quantize -> inject-mtp -> verify."""
    recipe = tmp_path / "w8a16.yaml"
    text = (RECIPES_DIR / "quant" / "w4a16-asym-g128.yaml").read_text()
    recipe.write_text(text.replace("name: w4a16-asym-g128", "name: w8a16").replace(
        "scheme: w4a16-asym-g128", f"scheme: {W8.name}"))
    spec = FixtureSpec(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, hidden_size=128,
                       moe_intermediate_size=128, intermediate_size=256, num_shards=1)
    base = write_fixture("glm4_moe", spec, tmp_path / "base")
    quantize(base, str(recipe), "tiny-local", tmp_path / "quantized")
    inject_mtp(base, tmp_path / "quantized", tmp_path / "artifact")
    checks = verify(tmp_path / "artifact", base, workers=2, sample=1)
    assert all(c.ok for c in checks), [c.failures for c in checks if not c.ok]
    art = Checkpoint(tmp_path / "artifact")
    mod = next(m for m in FAMILIES["glm4_moe"].routed_expert_linears(art.config) if m.endswith("down_proj"))
    assert {p: (art.tensors[f"{mod}.{p}"].dtype, art.tensors[f"{mod}.{p}"].shape) for p in W8.parts()} == \
        W8.tensors(128, 128)
    assert label_of(tmp_path / "artifact") == "W8A16"


def test_no_module_but_schemes_names_a_packed_layout():
    """The on-disk layout (part names, format, packing factors) is spelled only in mtpquant.model.schemes.
    expert_gptq.py is exempt: it names llm-compressor's in-memory quantization parameters of a module."""
    src = Path(__file__).resolve().parents[1] / "src" / "mtpquant"
    layout = re.compile(r"weight_packed|weight_zero_point|weight_shape|weight_g_idx|pack-quantized|//\s*8\b")
    exempt = {"schemes.py", "expert_gptq.py"}
    hits = [f"{p.relative_to(src)}:{i}" for p in sorted(src.rglob("*.py")) if p.name not in exempt
            for i, line in enumerate(p.read_text().splitlines(), 1) if layout.search(line)]
    assert hits == []
