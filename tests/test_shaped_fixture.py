"""The GLM-5.2-shaped checkpoint writer used by benchmarks/calib_speed.py, at fixture dimensions."""

from __future__ import annotations

import json

import torch

from mtpquant.core.checkpoint import Checkpoint
from mtpquant.model.families import layer_prefix
from mtpquant.tiny.shaped_fixture import FAMILY, SMALL_DIMS, glm5_config, tensor_specs, write_shaped_checkpoint


def test_real_dimensions_by_default():
    cfg = glm5_config(num_experts=256)
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok) == (6144, 2048, 8)
    specs = {n: s for n, s, _ in tensor_specs(glm5_config(num_experts=2))}
    experts = f"{layer_prefix(1)}{FAMILY.experts}.1"
    assert specs[f"{experts}.gate_proj.weight"] == (2048, 6144)
    assert specs[f"{experts}.down_proj.weight"] == (6144, 2048)


def test_written_in_the_real_layout_and_loadable(tmp_path):
    import transformers

    cfg = glm5_config(num_experts=4, **SMALL_DIMS)
    out = write_shaped_checkpoint(cfg, tmp_path / "ckpt", shard_bytes=1 << 20, device="cpu")
    ck = Checkpoint(out)
    t = ck.tensors
    assert t[f"{layer_prefix(1)}{FAMILY.experts}.3.up_proj.weight"].shape == (128, 256)
    assert t[f"{FAMILY.router_module(1)}.{FAMILY.fp32_suffixes[0]}"].dtype == "F32"
    assert len(set(ck.weight_map.values())) > 1  # several shards
    assert FAMILY.num_mtp(json.loads((out / "config.json").read_text())) == 0
    model = transformers.GlmMoeDsaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    assert fused.shape == (4, 256, 256) and fused.float().std().item() > 0.01
