"""The committed tiny trained model and its task: checksums, layout, data files, deterministic training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mtpquant.core.checkpoint import Checkpoint
from mtpquant.model.families import FAMILIES, family_for
from mtpquant.tiny.tiny_task import DATA, problems, write_data
from mtpquant.tiny.train_tiny import SUMS, TrainConfig, fit, tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "models" / "tiny-arith"


def test_committed_model_matches_its_sha256sums():
    lines = (MODEL / SUMS).read_text().splitlines()
    assert len(lines) >= 6
    for line in lines:
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((MODEL / name).read_bytes()).hexdigest() == digest, name


def test_committed_model_has_the_real_layout_and_an_mtp_layer():
    ck = Checkpoint(MODEL)
    fam = FAMILIES["glm4_moe"]
    cfg = ck.config
    assert family_for(cfg) is fam and fam.num_mtp(cfg) == 1
    experts = fam.routed_expert_linears(cfg)
    assert experts and all(f"{m}.weight" in ck.tensors for m in experts)
    mtp = fam.mtp_prefixes(cfg)[0]
    for extra in fam.mtp_extra:
        assert mtp + extra in ck.tensors
    assert ck.tensors[f"{mtp}{fam.experts}.0.gate_proj.weight"].dtype == "BF16"
    assert ck.tensors[f"{fam.router_module(fam.moe_layers(cfg)[0])}.{fam.fp32_suffixes[0]}"].dtype == "F32"
    expert_bytes = sum(ck.tensors[f"{m}.weight"].nbytes for m in experts)
    target_bytes = sum(t.nbytes for n, t in ck.tensors.items() if not n.startswith(mtp))
    assert expert_bytes > 0.4 * target_bytes  # the routed experts carry much of the model


def test_committed_model_solves_its_task():
    """Greedy decoding with transformers on problems of a seed it was not trained on (measured 0.975 on 40
    problems, 2026-12-02; the numbers that count come from vLLM + lm-eval)."""
    import torch
    import transformers

    from mtpquant.tiny.train_tiny import accuracy

    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    assert accuracy(model, tok, problems(12345, 40)) >= 0.8


def test_committed_data_files_are_what_the_generator_writes(tmp_path):
    write_data(tmp_path)
    for rel in DATA:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), rel


def test_problems_are_deterministic_and_consistent():
    a, b = problems(5, 50), problems(5, 50)
    assert a == b
    for p in a:
        total = eval(p["question"].rstrip("="))  # noqa: S307 (digits and +/- from our own generator)
        assert total == p["result"] and 0 <= total <= 99
        assert p["answer"].endswith(f"#### {total}\n")


def test_training_is_deterministic(tmp_path):
    import torch

    cfg = TrainConfig(steps=3, batch=8)
    tok = tokenizer(tmp_path / "tok")
    m1, mtp1, log1 = fit(cfg, tok)
    m2, mtp2, log2 = fit(cfg, tok)
    assert log1 == log2
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    for a, b in zip(mtp1.modules.parameters(), mtp2.modules.parameters(), strict=True):
        assert torch.equal(a, b)
    assert log1[0]["lm"] > 3  # it starts from scratch


def test_planted_outlier_channels_keep_the_function(tmp_path):
    import torch
    import transformers

    from mtpquant.tiny.fixture import fixture_tensors, write_checkpoint
    from mtpquant.tiny.train_tiny import plant_outliers, spec_for

    spec = spec_for(TrainConfig())
    tensors = fixture_tensors("glm4_moe", spec)
    plain = write_checkpoint("glm4_moe", spec, dict(tensors), tmp_path / "plain")
    changed = dict(tensors)
    channels = plant_outliers(changed, spec)
    assert sorted(channels) == ["1", "2"] and all(len(v) == 8 for v in channels.values())
    planted = write_checkpoint("glm4_moe", spec, changed, tmp_path / "planted")
    ids = torch.tensor([[5, 80, 90, 100, 7, 60, 61, 62]])
    logits = [transformers.Glm4MoeForCausalLM.from_pretrained(p, dtype=torch.float32).eval()(input_ids=ids).logits
              for p in (plain, planted)]
    assert torch.allclose(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    w = Checkpoint(planted)
    assert w.tensors  # and the outliers are there: 8 columns 16x the rest in every expert's gate/up
    from safetensors import safe_open

    name = next(m for m in FAMILIES["glm4_moe"].routed_expert_linears(w.config) if m.endswith("up_proj")) + ".weight"
    with safe_open(str(w.tensors[name].shard), "pt") as fh:
        col = fh.get_tensor(name).float().abs().mean(0)
    assert (col > 8 * col.median()).sum() == 8


def test_committed_model_has_its_planted_outliers():
    """The channels training.json records are the committed weights' outlier columns (> 8x the median column),
    in the gate and up projections of every MoE layer: training kept what was planted."""
    import torch
    from safetensors import safe_open

    ck = Checkpoint(MODEL)
    fam = FAMILIES["glm4_moe"]
    channels = json.loads((MODEL / "training.json").read_text())["outliers"]["channels"]
    assert sorted(channels) == [str(i) for i in fam.moe_layers(ck.config)]
    for layer, recorded in channels.items():
        for proj in ("gate_proj", "up_proj"):
            name = f"model.layers.{layer}.mlp.experts.0.{proj}.weight"
            with safe_open(str(ck.tensors[name].shard), "pt") as fh:
                col = fh.get_tensor(name).float().abs().mean(0)
            assert torch.nonzero(col > 8 * col.median()).flatten().tolist() == recorded, name
