import hashlib

import pytest
import torch
import transformers

from mtpquant.core.checkpoint import Checkpoint
from mtpquant.model.families import FAMILIES, layer_prefix
from mtpquant.model.recipes import FixtureSpec
from mtpquant.tiny.fixture import write_fixture


def digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_spec_same_bytes(tmp_path, family):
    a = write_fixture(family, FixtureSpec(), tmp_path / "a")
    b = write_fixture(family, FixtureSpec(), tmp_path / "b")
    c = write_fixture(family, FixtureSpec(seed=1), tmp_path / "c")
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_real_on_disk_layout(built, family):
    ck = Checkpoint(built[family]["base"])
    cfg, fam, t = ck.config, FAMILIES[family], ck.tensors
    assert fam.num_mtp(cfg) == 1
    assert len(ck.shard_files()) == 3
    assert (ck.root / "tokenizer.json").is_file()
    e = fam.num_experts(cfg)
    for layer in fam.moe_layers(cfg) + fam.mtp_layers(cfg):
        for i in range(e):
            gate = t[f"{layer_prefix(layer)}{fam.experts}.{i}.gate_proj.weight"]
            down = t[f"{layer_prefix(layer)}{fam.experts}.{i}.down_proj.weight"]
            assert gate.shape == (cfg["moe_intermediate_size"], cfg["hidden_size"]) and gate.dtype == "BF16"
            assert down.shape == (cfg["hidden_size"], cfg["moe_intermediate_size"])
    assert not any("gate_up_proj" in n for n in t), "fused experts must not be on disk"
    (mtp,) = fam.mtp_prefixes(cfg)
    for extra in fam.mtp_extra:
        assert mtp + extra in t
    assert t[mtp + "eh_proj.weight"].shape == (cfg["hidden_size"], 2 * cfg["hidden_size"])
    assert t[f"{fam.router_module(fam.moe_layers(cfg)[0])}.{fam.fp32_suffixes[0]}"].dtype == "F32"
    if fam.has_indexer:
        assert mtp + "self_attn.indexer.wk.weight" in t


def test_transformers_loads_it_and_drops_mtp(built, family):
    base = built[family]["base"]
    cls = getattr(transformers, FAMILIES[family].architecture)
    model, info = cls.from_pretrained(base, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"]
    fam, ck = FAMILIES[family], Checkpoint(base)
    prefixes = tuple(fam.mtp_prefixes(ck.config))
    assert info["unexpected_keys"] and all(k.startswith(prefixes) for k in info["unexpected_keys"])
    from safetensors import safe_open

    experts = f"{layer_prefix(2)}{fam.experts}"
    t = ck.tensors[f"{experts}.5.up_proj.weight"]
    with safe_open(str(t.shard), "pt") as fh:
        up = fh.get_tensor(t.name)
    fused = model.state_dict()[f"{experts}.gate_up_proj"]
    assert torch.equal(fused[5, up.shape[0]:], up)


@pytest.mark.parametrize("layers,mtp", [(2, 2), (5, 1)])
def test_layer_and_mtp_counts(tmp_path, layers, mtp):
    ck = Checkpoint(write_fixture("glm_moe_dsa", FixtureSpec(num_hidden_layers=layers, num_nextn_predict_layers=mtp),
                                  tmp_path / "m"))
    fam = FAMILIES["glm_moe_dsa"]
    assert fam.num_layers(ck.config) == layers
    assert fam.mtp_layers(ck.config) == list(range(layers, layers + mtp))
    for layer in range(layers, layers + mtp):
        assert f"{layer_prefix(layer)}eh_proj.weight" in ck.tensors
    assert f"{layer_prefix(layers + mtp)}eh_proj.weight" not in ck.tensors
