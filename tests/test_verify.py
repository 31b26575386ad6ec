import json

import pytest
import torch

from mtpquant.chain.verify import raise_on_failure, verify, verify_record
from mtpquant.core.errors import VerificationFailed
from mtpquant.model.families import FAMILIES, MTP_EXTRA_BASE, layer_prefix
from mtpquant.model.schemes import DEFAULT
from tests.conftest import edit_tensors, mtp_prefix, read_tensor

EH_PROJ, ENORM = MTP_EXTRA_BASE[:2]  # MTP-only tensors of both tiny families (Family.mtp_extra)


def expert(family: str, layer: int, e: int, proj: str) -> str:
    """The family's name of routed expert e's `proj` Linear in decoder layer `layer`."""
    return f"{layer_prefix(layer)}{FAMILIES[family].experts}.{e}.{proj}"


def failures(art, base):
    checks = verify(art, base)
    return {c.name: c.failures for c in checks if c.failures}


def test_good_artifact_passes(built, family, tmp_path):
    checks = verify(built[family]["artifact"], built[family]["base"])
    assert all(c.ok for c in checks), [c.failures for c in checks]
    assert len(checks) == 9
    rep = verify_record(built[family]["artifact"], built[family]["base"], checks)
    assert rep["ok"] is True and rep["artifact"] == str(built[family]["artifact"])
    assert [c["name"] for c in rep["checks"]] == [c.name for c in checks]


def test_quantized_without_mtp_fails(built, family):
    f = failures(built[family]["quantized"], built[family]["base"])
    mtp = f["MTP tensors present, unquantized, byte-identical to base"]
    assert f"{mtp_prefix(built[family]['base'])}{EH_PROJ} is missing" in mtp


def test_missing_mtp_tensor(artifact_copy):
    art, base = artifact_copy
    name = mtp_prefix(base) + ENORM
    edit_tensors(art, remove=[name])
    f = failures(art, base)
    assert f == {"MTP tensors present, unquantized, byte-identical to base": [f"{name} is missing"]}
    with pytest.raises(VerificationFailed, match=f"{name} is missing") as exc:
        raise_on_failure(verify(art, base))
    assert exc.value.exit_code == 3


def test_changed_mtp_bytes(artifact_copy):
    art, base = artifact_copy
    name = mtp_prefix(base) + EH_PROJ
    t = read_tensor(art, name).clone()
    t[0, 0] += 1
    edit_tensors(art, remove=[name], add={name: t}, shard="mtp-00001-of-00001.safetensors")
    (msg,) = failures(art, base)["MTP tensors present, unquantized, byte-identical to base"]
    assert msg.startswith(f"{name} differs from the base")


def test_one_expert_left_unquantized(artifact_copy, family):
    art, base = artifact_copy
    mod = expert(family, 2, 5, "up_proj")
    parts = [f"{mod}.{p}" for p in DEFAULT.parts()]
    edit_tensors(art, remove=parts, add={f"{mod}.weight": read_tensor(base, f"{mod}.weight")})
    f = failures(art, base)["every routed-expert Linear is INT4-packed"]
    assert f"{mod}.weight_packed is missing" in f
    assert f"{mod}.weight is present unquantized" in f


def test_quantized_attention_linear(artifact_copy):
    art, base = artifact_copy
    mod = "model.layers.1.self_attn.o_proj"
    o = read_tensor(art, f"{mod}.weight")
    dtypes = {"I32": torch.int32, "BF16": torch.bfloat16, "I64": torch.int64}
    add = {f"{mod}.{p}": torch.ones(shape, dtype=dtypes[d]) for p, (d, shape) in DEFAULT.tensors(*o.shape).items()}
    add[f"{mod}.weight_shape"] = torch.tensor(list(o.shape))
    edit_tensors(art, remove=[f"{mod}.weight"], add=add)
    f = failures(art, base)
    assert f["nothing but routed experts is quantized"] == [f"{mod} is quantized (attention)"]


def test_index_points_at_missing_shard(artifact_copy):
    art, base = artifact_copy
    idx_path = art / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    idx_path.write_text(json.dumps(idx))
    f = failures(art, base)["index maps every tensor to exactly one existing shard"]
    assert "index points at missing shard model-00009-of-00009.safetensors" in f
    assert any(x.startswith("model.norm.weight is in ") and x.endswith("indexed in model-00009-of-00009.safetensors")
               for x in f)


def test_unindexed_tensor_in_shard(artifact_copy):
    art, base = artifact_copy
    edit_tensors(art, add={"model.layers.0.extra.weight": torch.zeros(8, dtype=torch.bfloat16)})
    idx_path = art / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    del idx["weight_map"]["model.layers.0.extra.weight"]
    idx_path.write_text(json.dumps(idx))
    f = failures(art, base)["index maps every tensor to exactly one existing shard"]
    assert any("model.layers.0.extra.weight in" in x and "is not in the index" in x for x in f)


def test_mtp_missing_from_ignore(artifact_copy):
    art, base = artifact_copy
    cfg = json.loads((art / "config.json").read_text())
    mtp_ignore = FAMILIES[cfg["model_type"]].mtp_ignore(cfg)
    cfg["quantization_config"]["ignore"] = [i for i in cfg["quantization_config"]["ignore"] if i not in mtp_ignore]
    (art / "config.json").write_text(json.dumps(cfg))
    f = failures(art, base)["MTP layers are in quantization_config.ignore"]
    assert f"{mtp_prefix(base)}{EH_PROJ.removesuffix('.weight')} is not covered by ignore" in f


def test_fp32_tensor_downcast(artifact_copy, family):
    art, base = artifact_copy
    fam = FAMILIES[family]
    name = f"{fam.router_module(1)}.{fam.fp32_suffixes[0]}"
    edit_tensors(art, remove=[name], add={name: read_tensor(art, name).to(torch.bfloat16)})
    f = failures(art, base)["unquantized tensors keep the base's dtype and shape"]
    assert f == [f"{name} is BF16[8], base has F32[8]"]


def test_config_disagrees(artifact_copy):
    art, base = artifact_copy
    cfg = json.loads((art / "config.json").read_text())
    key = FAMILIES[cfg["model_type"]].mtp_key
    cfg[key] = 0
    (art / "config.json").write_text(json.dumps(cfg))
    f = failures(art, base)["config agrees with base and tensors"]
    assert f == [f"config.json {key}=0, base has 1"]


# ---------------------------------------------------------------- values: corruptions the format checks cannot see

VALUES = "quantized weights dequantize to their base weights (within GPTQ's measured error)"
PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def xor_byte(art, name: str, offset: int, mask: int) -> None:
    """Flip bits of one byte of a tensor, in place in its shard file (what a bad disk or copy does)."""
    from mtpquant.core.checkpoint import Checkpoint

    info = Checkpoint(art).tensors[name]
    with info.shard.open("r+b") as fh:
        fh.seek(info.start + offset)
        b = fh.read(1)[0]
        fh.seek(info.start + offset)
        fh.write(bytes([b ^ mask]))


def test_values_pass_and_say_how_close(built, family):
    (values,) = [c for c in verify(built[family]["artifact"], built[family]["base"]) if c.name == VALUES]
    assert values.ok and values.detail.startswith("48/48 Linears; worst: ")


def test_swapped_experts_are_caught(artifact_copy, family):
    art, base = artifact_copy
    a, b = expert(family, 2, 0, "down_proj"), expert(family, 2, 1, "down_proj")
    swapped = {f"{a}.{p}": read_tensor(art, f"{b}.{p}") for p in PARTS} | {
        f"{b}.{p}": read_tensor(art, f"{a}.{p}") for p in PARTS}
    edit_tensors(art, remove=list(swapped), add=swapped)
    f = failures(art, base)
    assert set(f) == {VALUES}
    assert sorted(m.split(":")[0] for m in f[VALUES]) == [a, b]
    assert all("x its RTN error" in m for m in f[VALUES])


@pytest.mark.parametrize("part,offset,mask,what", [
    ("weight_scale", 1, 0x40, "x its RTN error"),             # the exponent's top bit of the first BF16 scale
    ("weight_zero_point", 0, 0x88, "x that group's weight norm"),  # two zero points off by 8 steps
])
def test_one_flipped_byte_is_caught(artifact_copy, family, part, offset, mask, what):
    art, base = artifact_copy
    mod = expert(family, 1, 3, "gate_proj")
    xor_byte(art, f"{mod}.{part}", offset, mask)
    f = failures(art, base)
    assert set(f) == {VALUES} and len(f[VALUES]) == 1
    assert f[VALUES][0].startswith(f"{mod}: ") and what in f[VALUES][0], f[VALUES]


def test_swapped_weight_shape_is_caught(artifact_copy, family):
    art, base = artifact_copy
    mod = expert(family, 2, 4, "up_proj")
    shape = read_tensor(art, f"{mod}.weight_shape")
    edit_tensors(art, remove=[f"{mod}.weight_shape"], add={f"{mod}.weight_shape": shape.flip(0).contiguous()})
    f = failures(art, base)
    assert [m.split(" ")[0].rstrip(":") for m in f[VALUES]] == [mod]


def test_sample_checks_a_seeded_fraction(built, family):
    from mtpquant.chain.verify import check_values
    from mtpquant.core.checkpoint import Checkpoint
    from mtpquant.model.families import family_for
    from mtpquant.model.schemes import DEFAULT

    art, base = Checkpoint(built[family]["artifact"]), Checkpoint(built[family]["base"])
    fam = family_for(base.config)
    c = check_values(art, base, fam, DEFAULT, workers=2, sample=0.25, seed=1)
    assert c.ok and c.detail.startswith("12/48 Linears (seeded sample 0.25, seed 1)")


# ---------------------------------------------------------------- structure: what the config and the names claim

CONFIG = "config agrees with base and tensors"


def edit_config(art, change) -> None:
    cfg = json.loads((art / "config.json").read_text())
    change(cfg["quantization_config"])
    (art / "config.json").write_text(json.dumps(cfg))


def test_a_stray_tensor_beyond_the_mtp_range_is_caught(artifact_copy):
    art, base = artifact_copy
    stray = layer_prefix(8) + EH_PROJ  # past the one MTP layer (model.layers.3)
    edit_tensors(art, add={stray: torch.zeros(4, 4, dtype=torch.bfloat16)}, shard="mtp-00001-of-00001.safetensors")
    assert failures(art, base) == {"no tensor the base does not explain": [
        f"{stray} (mtp-00001-of-00001.safetensors) is not in the base"]}


def test_targets_that_match_nothing_are_caught(artifact_copy):
    art, base = artifact_copy
    edit_config(art, lambda qc: qc["config_groups"]["group_0"].__setitem__("targets", ["re:^nothing$"]))
    f = failures(art, base)[CONFIG]
    assert "is stored quantized, but the targets do not select it" in f[0] and "more modules" in f[-1]


def test_symmetric_with_stored_zero_points_is_caught(artifact_copy):
    art, base = artifact_copy
    edit_config(art, lambda qc: qc["config_groups"]["group_0"]["weights"].__setitem__("symmetric", True))
    assert any(m.startswith("symmetric: true, but 48 zero points are stored") for m in failures(art, base)[CONFIG])


def test_base_that_is_the_artifact_or_quantized_is_refused(built, family):
    from mtpquant.core.errors import MtpquantError

    art = built[family]["artifact"]
    with pytest.raises(MtpquantError, match="--base is the artifact itself"):
        verify(art, art)
    with pytest.raises(MtpquantError, match="the base is itself quantized"):
        verify(art, built[family]["quantized"])
