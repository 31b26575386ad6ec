"""expert_gptq against llm-compressor's own GPTQ on tiny models: same Hessians, same GPTQ, same losses;
torchrun data parallel (gloo, 2 CPU processes) against one process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtpquant.model.recipes import RECIPES_DIR, FixtureSpec

ROOT = Path(__file__).resolve().parents[1]


def tiny_calibration(tmp_path: Path, samples: int = 6, seq: int = 48) -> Path:
    p = tmp_path / "calib.yaml"
    p.write_text(json.dumps({
        "name": "calib", "num_samples": samples, "max_seq_length": seq, "seed": 0,
        "sources": [{"local": "data/calibration/tiny-code.jsonl", "text_field": "text", "weight": 1}],
    }))
    return p


def run_oneshot(base: Path, calib_path: Path, modifier_cls: type, **kw):
    """oneshot with `modifier_cls` on the fixture; returns (model, modifier, GPTQ loss per Linear)."""
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe

    from mtpquant.calib.calibration import build_dataset
    from mtpquant.calib.quantize import recording_gptq
    from mtpquant.model import recipes
    from mtpquant.model.families import FAMILIES

    cfg = json.loads((base / "config.json").read_text())
    target = FAMILIES["glm_moe_dsa"].routed_experts_target(cfg)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.GlmMoeDsaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    linearize_moe(model)
    calib = recipes.load("calibration", calib_path)
    ds, _ = build_dataset(calib, tok, str(calib_path))
    mod = modifier_cls(targets=[target], scheme="W4A16_ASYM", ignore=["lm_head"], **kw)
    with recording_gptq(model) as rec:
        oneshot(model=model, processor=tok, dataset=ds, recipe=mod, pipeline="sequential",
                moe_calibrate_all_experts=not kw, num_calibration_samples=calib.num_samples,
                max_seq_length=calib.max_seq_length, shuffle_calibration_samples=False)
    return model, mod, {r["module"]: r["loss"] for r in rec.rows}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mtpquant.tiny.fixture import write_fixture

    root = tmp_path_factory.mktemp("egptq")
    return write_fixture("glm_moe_dsa", FixtureSpec(num_hidden_layers=3), root / "base"), root


def test_same_hessians_and_losses_as_llm_compressor(tiny, tmp_path):
    """One shared gate/up Hessian per layer equals every expert's gate and up Hessian in llm-compressor;
    the down Hessians are equal too; the per-Linear GPTQ losses agree."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    from mtpquant.calib.expert_gptq import ExpertGPTQModifier

    seen: dict[str, dict] = {"plain": {}, "fast": {}}

    class PlainSpy(GPTQModifier):
        def compress_modules(self):
            for m, h in self._hessians.items():
                seen["plain"][self._module_names[m]] = (h / self._num_samples[m]).clone()
            return super().compress_modules()

    class FastSpy(ExpertGPTQModifier):
        def compress_modules(self):
            for m, h in self._hessians.items():
                seen["fast"][self._module_names[m]] = (h / self._num_samples[m]).clone()
            return super().compress_modules()

        def _solve_gate_up(self, layer):
            seen["fast"][layer.name + ".gate_up"] = (2 * layer.gate_up / layer.calls).clone()
            return super()._solve_gate_up(layer)

    base, _ = tiny
    calib = tiny_calibration(tmp_path)
    _, _, plain = run_oneshot(base, calib, PlainSpy)
    # small token_chunk: several flushes per layer, and a partial one at the end
    _, fast_mod, fast = run_oneshot(base, calib, FastSpy, token_chunk=100, hessian_inputs="bf16")
    # layer 2's inputs come from layer 1 after quantization: equal only if the propagation pass used the
    # quantized weights (the grouped forward restacks them after the solve)
    for layer, tol in ((1, 1e-5), (2, 1e-2)):
        shared = seen["fast"][f"model.layers.{layer}.mlp.experts.gate_up"]
        for e in range(8):
            for proj in ("gate_proj", "up_proj"):
                ref = seen["plain"][f"model.layers.{layer}.mlp.experts.{e}.{proj}"]
                torch.testing.assert_close(shared, ref, rtol=tol, atol=tol * ref.abs().max().item())
            name = f"model.layers.{layer}.mlp.experts.{e}.down_proj"
            ref = seen["plain"][name]
            torch.testing.assert_close(seen["fast"][name], ref, rtol=10 * tol, atol=tol * ref.abs().max().item())
    assert plain.keys() == fast.keys() and len(plain) == 2 * 8 * 3
    ratios = [fast[k] / plain[k] for k in plain]
    assert abs(statistics.median(ratios) - 1) < 1e-3
    assert max(abs(r - 1) for r in ratios) < 0.02
    assert fast_mod.timings["hessian_pass_s"] > 0 and fast_mod.timings["solve_s"] > 0


def test_shared_hessian_solve_matches_quantize_weight():
    """Rows of several modules solved against one factorization = llm-compressor's quantize_weight run per
    module with its own copy of the Hessian."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from mtpquant.calib.expert_gptq import factor_shared, shared_hessian_solve

    g = torch.Generator().manual_seed(0)
    n_mod, rows, cols = 3, 32, 256
    x = torch.randn(512, cols, generator=g) * torch.linspace(0.1, 2, cols)
    hessian = 2 * x.t() @ x / 512
    w = torch.randn(n_mod, rows, cols, generator=g)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128,
                            actorder="static")
    mins = w.view(n_mod, rows, cols // 128, 128).amin(-1)
    maxs = w.view(n_mod, rows, cols // 128, 128).amax(-1)
    scale, zp = calculate_qparams(mins, maxs, args)
    ref_q, ref_loss, _ = quantize_weight(w.clone(), hessian.expand(n_mod, -1, -1).clone(), scale, zp, None, args,
                                         blocksize=128, percdamp=0.01)
    hinv, perm, dead, g_idx, fallback = factor_shared(hessian.clone(), args, 0.01)
    q, row_loss = shared_hessian_solve(w.reshape(-1, cols).clone(), hinv, perm, dead, scale.reshape(n_mod * rows, -1),
                                       zp.reshape(n_mod * rows, -1), g_idx, args, 128)
    assert not fallback
    torch.testing.assert_close(row_loss.view(n_mod, rows).sum(1), ref_loss, rtol=1e-4, atol=1e-6)
    same = (q.view(n_mod, rows, cols) == ref_q).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of the quantized weights agree"


@pytest.mark.parametrize("inputs", ["fp32", "tf32", "bf16"])
def test_add_gram_is_exact_for_bf16_activations(inputs):
    from mtpquant.calib.expert_gptq import add_gram

    x = torch.randn(300, 64).to(torch.bfloat16)
    acc = torch.zeros(64, 64)
    add_gram(acc, x[:100], inputs)
    add_gram(acc, x[100:], inputs)
    ref = x.double().t() @ x.double()
    torch.testing.assert_close(acc.double(), ref, rtol=1e-5, atol=1e-4)


DP_CHILD = """
import sys
from pathlib import Path
from mtpquant.core.atomic import atomic_write_json
from mtpquant.calib.quantize import quantize
rep = quantize(Path(sys.argv[1]), sys.argv[2], "tiny-local", Path(sys.argv[3]))
if rep["rank"] == 0:
    atomic_write_json(Path(sys.argv[4]), rep)
"""


def test_torchrun_data_parallel_matches_one_process(built, tmp_path):
    """Two gloo ranks: each calibrates half of the samples; all-reduced Hessians give the losses of one
    process, rank 0 writes a complete artifact, the report counts every Linear."""
    base = built["glm_moe_dsa"]["base"]
    one = json.loads(built["glm_moe_dsa"]["quantize_report"].read_text())
    child = tmp_path / "child.py"
    child.write_text(DP_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    # --standalone: a free rendezvous port (a fixed one can be taken by another job on the machine)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(child), str(base), str(RECIPES_DIR / "quant" / "w4a16-asym-g128.yaml"),
                           str(tmp_path / "q"), str(tmp_path / "q.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-1500:], proc.stderr[-3000:])
    two = json.loads((tmp_path / "q.json").read_text())
    assert two["ranks"] == 2 and two["quantized_linears"] == two["expected_linears"] == 48
    a = {r["module"]: r["loss"] for r in one["per_linear"]}
    b = {r["module"]: r["loss"] for r in two["per_linear"]}
    assert a.keys() == b.keys()
    ratios = [b[k] / a[k] for k in a]
    assert abs(statistics.median(ratios) - 1) < 5e-3, statistics.median(ratios)
    assert sum(sum(v) for v in two["routing_counts"].values()) == sum(sum(v) for v in one["routing_counts"].values())
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)


def test_sorted_routed_forward_equals_llm_compressor_forward(tiny):
    """The calibration-time routed forward gives LinearExperts2D's routed output (float32 weights so that
    only the summation order can differ)."""
    import transformers
    from llmcompressor.modeling.moe.linearize import linearize_moe

    from mtpquant.calib.expert_gptq import grouped_routed_forward, sorted_routed_forward, stack_experts

    base, _ = tiny
    model = transformers.GlmMoeDsaForCausalLM.from_pretrained(base, dtype=torch.float32)
    linearize_moe(model)
    experts = model.model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 256, generator=g)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])
    idx[:, 0] = 3  # expert 3 takes every token, some experts none
    w = torch.rand(40, 2, generator=g)
    ref = experts(x, idx, w)
    torch.testing.assert_close(sorted_routed_forward(experts, x, idx, w), ref, rtol=1e-5, atol=1e-6)
    model.to(torch.bfloat16)
    ref = experts(x.bfloat16(), idx, w.bfloat16()).float()
    got = grouped_routed_forward(experts, stack_experts(experts), x.bfloat16(), idx, w.bfloat16()).float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2  # bf16 operands, different summation order


def test_a_rank_of_the_expert_split_allocates_only_its_down_hessians():
    """Under the expert split a rank forms the down_proj Hessians of its own experts only: the accumulator has
    one row per owned expert (whole solve batches: 16-row down_projs, 32 rows at once -> pairs), not all E."""
    from types import SimpleNamespace

    from mtpquant.calib.expert_gptq import ExpertGPTQModifier, ExpertLayer

    def expert():
        return SimpleNamespace(gate_proj=torch.nn.Linear(16, 8, bias=False), up_proj=torch.nn.Linear(16, 8, bias=False),
                               down_proj=torch.nn.Linear(8, 16, bias=False))

    for share, owned in ((None, list(range(8))), ((0, 2), [0, 1, 2, 3]), ((1, 2), [4, 5, 6, 7]),
                         ((2, 3), [6, 7])):
        layer = ExpertLayer("layer", torch.nn.Module(), [expert() for _ in range(8)])
        ExpertGPTQModifier(expert_share=share, solve_rows=32)._allocate(layer, torch.device("cpu"))
        assert layer.owned == owned and tuple(layer.down.shape) == (len(owned), 8, 8)
        assert tuple(layer.gate_up.shape) == (16, 16)
