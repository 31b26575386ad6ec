"""The two families added through the family registry alone: DeepSeek-V3 (MTP index-stored at
model.layers.{num_hidden_layers}) and Qwen3-Next (MTP under `mtp.`). Each: the model recipe's tiny fixture in the
real on-disk layout, loaded by transformers itself (no missing keys, the MTP tensors dropped as upstream does), and
prepare -> quantize -> inject-mtp -> verify -> manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from mtpquant.calib.quantize import quantize
from mtpquant.chain.inject_mtp import inject_mtp
from mtpquant.chain.manifest import check_manifest, write_manifest
from mtpquant.chain.prepare import prepare
from mtpquant.chain.verify import verify
from mtpquant.core.checkpoint import Checkpoint, tensor_sha256
from mtpquant.core.run import Run
from mtpquant.model.families import FAMILIES

RECIPES = {"deepseek_v3": "tiny-deepseek-v3", "qwen3_next": "tiny-qwen3-next"}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    family = request.param
    run = Run(tmp_path_factory.mktemp(family))
    run.record("prepare", prepare(RECIPES[family], run.base))
    run.record("quantize", quantize(run.base, "w4a16-asym-g128", "tiny-local", run.quantized))
    run.record("inject-mtp", inject_mtp(run.base, run.quantized, run.artifact))
    checks = verify(run.artifact, run.base)
    write_manifest(run.artifact, run)
    return {"family": FAMILIES[family], "run": run, "checks": checks}


def _mtp_names(ck: Checkpoint, fam: Any) -> list[str]:
    return sorted(n for n in ck.tensors if n.startswith(tuple(fam.mtp_prefixes(ck.config))))


def test_fixture_is_what_transformers_loads(chain):
    fam, base = chain["family"], chain["run"].base
    ck = Checkpoint(base)
    assert ck.config["model_type"] == fam.model_type and ck.config[fam.mtp_key] == 1
    cls = getattr(transformers, fam.architecture)
    model, info = cls.from_pretrained(base, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"]
    prefixes = tuple(fam.mtp_prefixes(ck.config))
    assert all(k.startswith(prefixes) for k in info["unexpected_keys"])  # only MTP tensors are left over
    assert not any(n.startswith(prefixes) for n in model.state_dict())  # dropped on load, as upstream does
    mtp = _mtp_names(ck, fam)
    for extra in fam.mtp_extra:
        assert any(n.endswith(extra) for n in mtp)
    assert any(f"{fam.mtp_block(ck.config, 0)}{fam.experts}.0.gate_proj.weight" == n for n in mtp)
    assert not any("gate_up_proj" in n for n in ck.tensors), "fused experts must not be on disk"


def test_chain_quantizes_only_routed_experts(chain):
    fam, run = chain["family"], chain["run"]
    base, art = Checkpoint(run.base), Checkpoint(run.artifact)
    expected = fam.routed_expert_linears(base.config)
    assert len(expected) == 2 * 4 * 3  # 2 MoE layers x 4 experts x 3
    assert {n.removesuffix(".weight_packed") for n in art.tensors if n.endswith(".weight_packed")} == set(expected)
    assert run.read_record("quantize")["quantized_linears"] == len(expected)


def test_chain_injects_mtp_byte_for_byte(chain):
    fam, run = chain["family"], chain["run"]
    base, art = Checkpoint(run.base), Checkpoint(run.artifact)
    mtp = _mtp_names(base, fam)
    assert mtp and _mtp_names(art, fam) == mtp
    assert all(art.weight_map[n].startswith("mtp-") for n in mtp)
    assert all(tensor_sha256(art.tensors[n]) == tensor_sha256(base.tensors[n]) for n in mtp)
    ignore = art.config["quantization_config"]["ignore"]
    assert all(p in ignore for p in fam.mtp_ignore(base.config))
    assert art.config[fam.mtp_key] == 1


def test_chain_verifies_and_has_a_manifest(chain):
    failed = [(c.name, c.failures[:3]) for c in chain["checks"] if not c.ok]
    assert not failed
    assert len(chain["checks"]) == 9
    result = check_manifest(chain["run"].artifact)
    assert not (result["missing"] or result["extra"] or result["changed"])
    assert result["files"] == len([p for p in Path(chain["run"].artifact).iterdir()]) - 1


def test_registry_is_the_only_list_of_families():
    from mtpquant.cli import build_parser
    from mtpquant.model.recipes import load

    fixture = next(a for a in build_parser()._subparsers._group_actions[0].choices["fixture"]._actions
                   if a.dest == "family")
    assert list(fixture.choices) == list(FAMILIES)
    for family, ref in RECIPES.items():
        assert load("models", ref).family == family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_targets_and_ignore_keep_mtp_out(family):
    from mtpquant.model.families import matches
    from mtpquant.model.recipes import FixtureSpec

    fam = FAMILIES[family]
    cfg = fam.fixture_config(FixtureSpec())
    target = fam.routed_experts_target(cfg)
    mtp_expert = f"{fam.mtp_block(cfg, 0)}{fam.experts}.0.gate_proj"
    assert fam.classify(mtp_expert, cfg) == "mtp" and not matches(target, mtp_expert)
    assert all(matches(target, n) and fam.classify(n, cfg) == "routed_expert" for n in fam.routed_expert_linears(cfg))
    assert any(matches(p, mtp_expert) for p in fam.mtp_ignore(cfg))
    assert not any(matches(p, n) for p in fam.mtp_ignore(cfg) for n in fam.routed_expert_linears(cfg))
    assert fam.classify(fam.router_module(fam.moe_layers(cfg)[0]) + ".weight", cfg) == "router"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cost_model_reads_the_family(family):
    from mtpquant.calib.calib_cost import shape_from_config
    from mtpquant.model.recipes import FixtureSpec

    spec = FixtureSpec(num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=6)
    shape = shape_from_config(FAMILIES[family].fixture_config(spec))
    assert (shape.moe_layers, shape.dense_layers, shape.experts, shape.mtp_layers) == (2, 2, 6, 1)
    assert shape.attn_params > 0 and shape.embed_params >= 2 * 320 * 256
