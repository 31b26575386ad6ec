import json

import pytest
import torch

from mtpquant.errors import VerificationFailed
from mtpquant.verify import raise_on_failure, verify, verify_record
from tests.conftest import edit_tensors, read_tensor


def failures(art, base):
    checks = verify(art, base)
    return {c.name: c.failures for c in checks if c.failures}


def test_good_artifact_passes(built, family, tmp_path):
    checks = verify(built[family]["artifact"], built[family]["base"])
    assert all(c.ok for c in checks), [c.failures for c in checks]
    assert len(checks) == 7
    rep = verify_record(built[family]["artifact"], built[family]["base"], checks)
    assert rep["ok"] is True and rep["artifact"] == str(built[family]["artifact"])
    assert [c["name"] for c in rep["checks"]] == [c.name for c in checks]


def test_quantized_without_mtp_fails(built, family):
    f = failures(built[family]["quantized"], built[family]["base"])
    mtp = f["MTP tensors present, unquantized, byte-identical to base"]
    assert "model.layers.3.eh_proj.weight is missing" in mtp


def test_missing_mtp_tensor(artifact_copy):
    art, base = artifact_copy
    edit_tensors(art, remove=["model.layers.3.enorm.weight"])
    f = failures(art, base)
    assert f == {"MTP tensors present, unquantized, byte-identical to base": ["model.layers.3.enorm.weight is missing"]}
    with pytest.raises(VerificationFailed, match="model.layers.3.enorm.weight is missing") as exc:
        raise_on_failure(verify(art, base))
    assert exc.value.exit_code == 3


def test_changed_mtp_bytes(artifact_copy):
    art, base = artifact_copy
    name = "model.layers.3.eh_proj.weight"
    t = read_tensor(art, name).clone()
    t[0, 0] += 1
    edit_tensors(art, remove=[name], add={name: t}, shard="mtp-00001-of-00001.safetensors")
    (msg,) = failures(art, base)["MTP tensors present, unquantized, byte-identical to base"]
    assert msg.startswith(f"{name} differs from the base")


def test_one_expert_left_unquantized(artifact_copy):
    art, base = artifact_copy
    mod = "model.layers.2.mlp.experts.5.up_proj"
    parts = [f"{mod}.{p}" for p in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")]
    edit_tensors(art, remove=parts, add={f"{mod}.weight": read_tensor(base, f"{mod}.weight")})
    f = failures(art, base)["every routed-expert Linear is INT4-packed"]
    assert f"{mod}.weight_packed is missing" in f
    assert f"{mod}.weight is present unquantized" in f


def test_quantized_attention_linear(artifact_copy):
    art, base = artifact_copy
    src = "model.layers.1.mlp.experts.0.gate_proj"
    mod = "model.layers.1.self_attn.o_proj"
    o = read_tensor(art, f"{mod}.weight")
    add = {f"{mod}.weight_packed": torch.zeros(o.shape[0], o.shape[1] // 8, dtype=torch.int32),
           f"{mod}.weight_scale": torch.ones(o.shape[0], o.shape[1] // 128, dtype=torch.bfloat16),
           f"{mod}.weight_zero_point": torch.zeros(o.shape[0] // 8, o.shape[1] // 128, dtype=torch.int32),
           f"{mod}.weight_shape": read_tensor(art, f"{src}.weight_shape")}
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
    cfg["quantization_config"]["ignore"] = [i for i in cfg["quantization_config"]["ignore"] if "layers\\.3" not in i]
    (art / "config.json").write_text(json.dumps(cfg))
    f = failures(art, base)["MTP layers are in quantization_config.ignore"]
    assert "model.layers.3.eh_proj is not covered by ignore" in f


def test_fp32_tensor_downcast(artifact_copy):
    art, base = artifact_copy
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    edit_tensors(art, remove=[name], add={name: read_tensor(art, name).to(torch.bfloat16)})
    f = failures(art, base)["unquantized tensors keep the base's dtype and shape"]
    assert f == [f"{name} is BF16[8], base has F32[8]"]


def test_config_disagrees(artifact_copy):
    art, base = artifact_copy
    cfg = json.loads((art / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (art / "config.json").write_text(json.dumps(cfg))
    f = failures(art, base)["config agrees with base and tensors"]
    assert f == ["config.json num_nextn_predict_layers=0, base has 1"]
