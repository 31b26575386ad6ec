import hashlib
import json
import re
import shutil

import pytest

from mtpquant.chain.inject_mtp import inject_mtp
from mtpquant.core.checkpoint import Checkpoint, tensor_sha256
from mtpquant.core.errors import MtpquantError
from mtpquant.model.families import FAMILIES
from mtpquant.model.recipes import FixtureSpec
from mtpquant.tiny.fixture import write_fixture


def test_mtp_tensors_survive_byte_for_byte(built, family):
    base, art = Checkpoint(built[family]["base"]), Checkpoint(built[family]["artifact"])
    fam = FAMILIES[family]
    (prefix,) = fam.mtp_prefixes(base.config)
    mtp = [n for n in base.tensors if n.startswith(prefix)]
    assert len(mtp) > 20
    for n in mtp:
        assert art.tensors[n].dtype == base.tensors[n].dtype
        assert tensor_sha256(art.tensors[n]) == tensor_sha256(base.tensors[n])
        assert art.weight_map[n].startswith("mtp-")
    assert fam.num_mtp(art.config) == 1
    assert fam.mtp_ignore(base.config) == ["re:^model\\.layers\\.3\\..*"]  # the tiny spec: 3 decoder layers
    assert fam.mtp_ignore(base.config)[0] in art.config["quantization_config"]["ignore"]
    assert art.index["metadata"]["total_size"] == sum(t.nbytes for t in art.tensors.values())


def test_quantized_input_is_untouched(built, family):
    q, fam = built[family]["quantized"], FAMILIES[family]
    eh_proj = fam.mtp_prefixes(Checkpoint(built[family]["base"]).config)[0] + "eh_proj.weight"
    assert not (q / "model.safetensors.index.json").exists() or eh_proj not in (
        q / "model.safetensors.index.json").read_text()
    assert fam.num_mtp(json.loads((q / "config.json").read_text())) == 1


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_idempotent_and_in_place(built, family, tmp_path):
    b = built[family]
    once = _digest(b["artifact"])
    again = tmp_path / "again"
    shutil.copytree(b["artifact"], again)
    inject_mtp(b["base"], again, again)  # re-inject into an already injected artifact, in place
    assert _digest(again) == once


def test_small_shards(built, tmp_path):
    b = built["glm_moe_dsa"]
    rep = inject_mtp(b["base"], b["quantized"], tmp_path / "a", max_shard_bytes=256 << 10)
    assert rep["shards"] > 3
    art = Checkpoint(tmp_path / "a")
    prefixes = tuple(FAMILIES["glm_moe_dsa"].mtp_prefixes(art.config))
    assert len({s for n, s in art.weight_map.items() if n.startswith(prefixes)}) == rep["shards"]


def test_base_without_mtp_tensors_is_an_error(built, tmp_path):
    b = built["glm4_moe"]
    no_mtp = tmp_path / "base"
    shutil.copytree(b["base"], no_mtp)
    (prefix,) = FAMILIES["glm4_moe"].mtp_prefixes(Checkpoint(no_mtp).config)
    idx = json.loads((no_mtp / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if not k.startswith(prefix)}
    (no_mtp / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(MtpquantError, match=f"no MTP tensors under {re.escape(prefix)}"):
        inject_mtp(no_mtp, b["quantized"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_without_num_nextn_is_an_error(built, tmp_path):
    b = built["glm4_moe"]
    base = tmp_path / "base"
    shutil.copytree(b["base"], base)
    key = FAMILIES["glm4_moe"].mtp_key
    cfg = json.loads((base / "config.json").read_text())
    del cfg[key]
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MtpquantError, match=f"{key} is missing"):
        inject_mtp(base, b["quantized"], tmp_path / "out")


def test_architecture_mismatch_is_an_error(built, tmp_path):
    with pytest.raises(MtpquantError, match="architecture Glm4MoeForCausalLM does not match"):
        inject_mtp(built["glm_moe_dsa"]["base"], built["glm4_moe"]["quantized"], tmp_path / "out")
    other = write_fixture("glm_moe_dsa", FixtureSpec(num_hidden_layers=4), tmp_path / "other")
    with pytest.raises(MtpquantError, match="num_hidden_layers=3 does not match the base's 4"):
        inject_mtp(other, built["glm_moe_dsa"]["quantized"], tmp_path / "out")


def test_unquantized_target_is_an_error(built, tmp_path):
    with pytest.raises(MtpquantError, match="no quantization_config"):
        inject_mtp(built["glm4_moe"]["base"], built["glm4_moe"]["base"], tmp_path / "out")


def test_buffered_fallback_writes_the_same_bytes(built, tmp_path, monkeypatch):
    """Where copy_file_range is unavailable, the chunked copy must produce identical shards."""
    import os

    b = built["glm_moe_dsa"]
    inject_mtp(b["base"], b["quantized"], tmp_path / "kernel")
    monkeypatch.delattr(os, "copy_file_range")
    monkeypatch.setattr("mtpquant.core.checkpoint.CHUNK", 4096)  # many chunks per tensor
    inject_mtp(b["base"], b["quantized"], tmp_path / "buffered")
    assert _digest(tmp_path / "kernel") == _digest(tmp_path / "buffered")
