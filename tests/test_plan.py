"""`mtpquant plan`: arithmetic on recipes, and the refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mtpquant.calib.calib_cost import shape_from_config
from mtpquant.calib.plan import (
    GPUSpec,
    activation_copy_s,
    make_plan,
    overlapped_seconds,
    plan_for_shape,
    refuse,
    stream_plan,
)
from mtpquant.cli import main
from mtpquant.core.checkpoint import Checkpoint
from mtpquant.core.errors import MtpquantError
from mtpquant.model.recipes import RECIPES_DIR, load


def test_parameter_count_matches_the_model():
    """The counts behind every prediction equal the parameters of the model transformers builds."""
    import torch
    import transformers

    from mtpquant.model.recipes import FixtureSpec
    from mtpquant.tiny.fixture import config_for

    cfg = config_for("glm_moe_dsa", FixtureSpec(num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=6))
    shape = shape_from_config(cfg.to_dict())
    with torch.device("meta"):
        model = transformers.GlmMoeDsaForCausalLM(cfg)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert (shape.moe_layers, shape.dense_layers, shape.experts) == (2, 2, 6)


def test_glm52_real_dimensions():
    shape = shape_from_config({"model_type": "glm_moe_dsa", **load("models", "glm-5.2").config})
    assert 740e9 < shape.total_params < 748e9  # GLM-5: 744B
    assert 1.45e12 < shape.bf16_bytes() < 1.55e12  # 1.49 TB in BF16 (seed write-up)
    # fast path: one shared 6144² gate/up Hessian + 256 down Hessians; llm-compressor: 512 + 256
    assert shape.hessian_bytes(fast=True) == 4 * (6144**2 + 256 * 2048**2)
    assert shape.hessian_bytes(fast=False) > 80e9


def test_plan_8x_and_4x_h200_fit_and_more_gpus_is_faster():
    p8 = make_plan("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128", GPUSpec.of("h200", 8))
    p4 = make_plan("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128", GPUSpec.of("h200", 4))
    for p in (p8, p4):
        refuse(p)  # raises if it does not fit
        assert p.tokens == 768 * 512
        assert 0 < p.gpu_peak_gib < 139
        assert p.disk_gib["source"] > p.disk_gib["output"] > 0
        assert abs(p.seconds["total"] - sum(v for k, v in p.seconds.items() if k != "total")) < 1
    assert p8.seconds["calibration"] < p4.seconds["calibration"]
    assert p8.subgraphs[1].name.startswith("MoE decoder layer") and p8.subgraphs[1].count == 75


def test_llm_compressor_default_does_not_fit_one_h100(tmp_path):
    """Without fast_experts (llm-compressor's per-Linear FP32 Hessians) a GLM-5.2 MoE layer needs more than
    an 80 GB card: the planner refuses before anything starts; with it, it fits."""
    import yaml

    recipe = yaml.safe_load((RECIPES_DIR / "quant" / "w4a16-asym-g128.yaml").read_text())
    recipe.pop("fast_experts")
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(recipe))
    with pytest.raises(MtpquantError, match=r"MoE layer needs .* GiB per GPU \(largest part: hessians"):
        refuse(make_plan("glm-5.2", "glm5-code-instruct", str(plain), GPUSpec.of("h100", 1)))
    refuse(make_plan("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128", GPUSpec.of("h100", 1)))


def test_cli_refuses_in_one_line(capsys, tmp_path):
    code = main(["plan", "--model", "glm-5.2", "--calibration", "glm5-code-instruct", "--gpu", "h100",
                 "--gpus", "8", "--gpu-memory-gib", "24", "--json", str(tmp_path / "plan.json")])
    err = capsys.readouterr().err
    assert code == 2
    line = [x for x in err.splitlines() if "error:" in x]
    assert line and "plan refused for glm-5.2 on 8xh100 (24 GiB)" in " ".join(err.split())
    assert json.loads((tmp_path / "plan.json").read_text())["refusals"]


def test_cli_refuses_small_disk(capsys):
    code = main(["plan", "--model", "glm-5.2", "--calibration", "glm5-code-instruct", "--disk-gib", "1000"])
    assert code == 2
    assert "GiB of disk" in " ".join(capsys.readouterr().err.split())


def test_unknown_gpu_and_missing_dimensions(tmp_path):
    with pytest.raises(MtpquantError, match="unknown GPU type 'a100'"):
        GPUSpec.of("a100", 1)
    model = tmp_path / "m.yaml"
    model.write_text("name: m\nfamily: glm_moe_dsa\nsource: {hub: a/b, revision: UNPINNED}\n")
    with pytest.raises(MtpquantError, match=r"m.yaml: no dimensions for this model"):
        make_plan(str(model), "glm5-code-instruct", "w4a16-asym-g128", GPUSpec.of("h200", 8))


def test_tiny_fixture_plan_is_small():
    p = make_plan("tiny-glm5", "tiny-local", "w4a16-asym-g128", GPUSpec.of("h100", 1))
    assert p.gpu_peak_gib < 4 and p.tokens == 16 * 256 and not p.refusals


def test_time_scales_with_tokens():
    shape = shape_from_config({"model_type": "glm_moe_dsa", **load("models", "glm-5.2").config})
    quant = load("quant", "w4a16-asym-g128")
    a = plan_for_shape("x", shape, 768, 512, quant, GPUSpec.of("h200", 8))
    b = plan_for_shape("x", shape, 1536, 512, quant, GPUSpec.of("h200", 8))
    assert b.seconds["calibration"] > 1.2 * a.seconds["calibration"]  # the layer onload does not scale
    assert b.seconds["solve"] == a.seconds["solve"]  # the solve does not depend on tokens


def test_activations_on_gpu_trade_memory_for_the_copies():
    """`fast_experts.activations: gpu` holds the activation cache on the card and drops one pageable copy
    per MoE-layer pass, per dense layer and after the embeddings (run D); `cpu` keeps llm-compressor's."""
    shape = shape_from_config({"model_type": "glm_moe_dsa", **load("models", "glm-5.2").config})
    quant = load("quant", "w4a16-asym-g128")

    def with_activations(mode: str):
        q = dataclasses.replace(quant, fast_experts=dataclasses.replace(quant.fast_experts, activations=mode))
        return plan_for_shape("x", shape, 768, 512, q, GPUSpec.of("h200", 8))

    cpu, gpu = with_activations("cpu"), with_activations("gpu")
    copy = activation_copy_s(shape, 96 * 512)
    expected = (2 * shape.moe_layers + shape.dense_layers + 1) * copy
    assert cpu.seconds["calibration"] - gpu.seconds["calibration"] == pytest.approx(expected, abs=0.2)
    assert gpu.subgraphs[1].parts_gib["activations"] == pytest.approx(1.25 * 96 * 512 * 6144 * 2 / 2**30, rel=0.01)
    assert "activations" not in cpu.subgraphs[1].parts_gib
    assert gpu.gpu_peak_gib > cpu.gpu_peak_gib


def test_plan_says_when_one_process_beats_torchrun():
    """Measured in run D: under torchrun load and save are ~3x slower than in one process and do not speed up
    with ranks; for the full model that outweighs 8 ranks' calibration, and the plan says so."""
    p8 = make_plan("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128", GPUSpec.of("h200", 8))
    p1 = make_plan("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128", GPUSpec.of("h200", 1))
    assert p8.seconds["calibration"] < p1.seconds["calibration"] and p8.seconds["load"] > p1.seconds["load"]
    assert p1.seconds["total"] < p8.seconds["total"]
    assert len(p8.notes) == 1 and p8.notes[0].startswith("one process on one h200 is predicted faster")
    assert not p1.notes


def test_overlapped_seconds_take_the_longest_stage_per_layer():
    # layer i computes while i+1 is read and i-1 is written; the first read and the last write are exposed
    assert overlapped_seconds([10, 10, 10], [1, 1, 1], [2, 2, 2]) == 1 + 30 + 2
    assert overlapped_seconds([1, 1, 1], [5, 5, 5], [2, 2, 2]) == 5 + (5 + 5 + 2) + 2  # read bound
    assert overlapped_seconds([], [], []) == 0.0


def test_stream_plan_glm52_one_h200_fits_a_normal_host():
    """The stream engine's host RAM is a few layers and the activations, not the model: GLM-5.2 on one H200
    fits 128 GiB where the memory engine needs ~1.4 TB; the plan says which engine it assumed, bounds its
    time between the slowest stage and no overlap at all, and prices a resume."""
    args = ("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128", GPUSpec.of("h200", 1))
    st, mem = make_plan(*args, engine="stream"), make_plan(*args)
    refuse(st)
    assert (st.engine, mem.engine) == ("stream", "memory")
    assert st.host_ram_gib < 128 < 1000 < mem.host_ram_gib
    assert st.disk_gib["offload"] == 0 and st.disk_gib["activations"] > 0
    x = st.stream
    assert max(x["gpu_s"], x["read_s"], x["write_s"]) <= st.seconds["layers"] + 1
    assert st.seconds["layers"] <= x["gpu_s"] + x["read_s"] + x["write_s"]
    assert 0 < x["io_hidden_s"] <= x["read_s"] + x["write_s"]
    assert 0 < x["resume_worst_s"] < st.seconds["total"] / 2
    assert abs(st.seconds["total"] - sum(v for k, v in st.seconds.items() if k != "total")) < 1
    assert st.to_json()["engine"] == "stream"


def test_stream_host_ram_does_not_grow_with_layers():
    shape = shape_from_config({"model_type": "glm_moe_dsa", **load("models", "glm-5.2").config})
    quant = load("quant", "w4a16-asym-g128")
    few = dataclasses.replace(shape, moe_layers=4)
    a = stream_plan("few", few, 768, 512, quant, GPUSpec.of("h200", 1))
    b = stream_plan("all", shape, 768, 512, quant, GPUSpec.of("h200", 1))
    assert a.host_ram_gib == b.host_ram_gib and a.seconds["layers"] < b.seconds["layers"]
    assert a.disk_gib["source"] < b.disk_gib["source"]


def test_engine_auto_and_stream_refusals():
    args = ("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128", GPUSpec.of("h200", 1))
    assert make_plan(*args, engine="auto").engine == "memory"  # no host RAM given: the reference engine
    assert make_plan(*args, host_ram_gib=128, engine="auto").engine == "stream"
    assert make_plan(*args, host_ram_gib=4096, engine="auto").engine == "memory"
    with pytest.raises(MtpquantError, match="host RAM"):
        refuse(make_plan(*args, host_ram_gib=32, engine="stream"))



def test_quantize_engine_auto_streams_what_the_node_cannot_hold(tmp_path):
    """`quantize --engine auto`: the memory engine's host need (MEMORY_HOST_X x the BF16 model, the activation
    cache where it waits on the host, each process's own) against the node's RAM. GLM-5.2 streams on any node
    short of ~3 TB; a tiny checkpoint takes the memory engine on this machine and streams on a node given less
    than its need; the activation cache counts only where it waits on the host."""
    from mtpquant.calib.plan import MEMORY_HOST_X, model_config, quantize_engine, quantize_engine_here
    from mtpquant.core.measure import host_ram_gib
    from mtpquant.model.recipes import FixtureSpec
    from mtpquant.tiny.fixture import write_fixture

    quant, calib = load("quant", "w4a16-asym-g128"), load("calibration", "glm5-code-instruct")
    glm = model_config(load("models", "glm-5.2"), "glm-5.2")
    engine, why = quantize_engine(glm, calib, quant, 2048, 141, 8)
    assert engine == "stream" and "does not fit this node's 2,048 GiB" in why
    need = float(why.split("~")[1].split(" GiB")[0].replace(",", ""))
    model_gib = shape_from_config(glm).bf16_bytes(with_mtp=False) / 2**30
    assert MEMORY_HOST_X * model_gib < need < MEMORY_HOST_X * model_gib + 8 * 16 + 1  # cache on the GPU
    assert quantize_engine(glm, calib, quant, need + 1, 141, 8)[0] == "memory"
    on_host = float(quantize_engine(glm, calib, quant, 2048, None, 8)[1].split("~")[1].split(" GiB")[0]
                    .replace(",", ""))
    assert on_host > need  # no GPU: the activation cache waits on the host
    base = write_fixture("glm4_moe", FixtureSpec(), tmp_path / "base")
    engine, why = quantize_engine_here(base, "w4a16-asym-g128", "tiny-local")
    assert engine == "memory" and f"{host_ram_gib():,.0f} GiB" in why
    assert quantize_engine(Checkpoint(base).config, load("calibration", "tiny-local"), quant, 8, None, 1)[0] == "stream"


def test_stream_plan_on_several_gpus_takes_the_faster_split():
    """8 ranks: the layer split keeps one GPU's serial GPU work and spreads the I/O; the expert split divides
    the experts' Hessians and solves (in whole batches: GLM-5.2's 13 down_proj batches give some rank 2 of
    them) but repeats the rest of each layer on every rank. For GLM-5.2, GPU-bound on one H200, the expert
    split is the faster and is the one planned; both need every rank's host buffers on the node."""
    args = ("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128")
    one = make_plan(*args, GPUSpec.of("h200", 1), engine="stream")
    eight = make_plan(*args, GPUSpec.of("h200", 8), engine="stream")
    assert eight.gpus.startswith("8x") and eight.stream["ranks"] == 8
    splits = eight.stream["splits_s"]
    assert splits["layers"] < one.seconds["layers"]  # I/O spread; the serial GPU work bounds it
    assert one.stream["gpu_s"] <= splits["layers"]
    assert eight.stream["split"] == "experts" and eight.seconds["layers"] == splits["experts"] < splits["layers"]
    assert one.stream["gpu_s"] / 8 < eight.stream["gpu_s"] < one.stream["gpu_s"]  # the repeated part stays
    assert "--split experts" in " ".join(eight.notes)
    assert abs(eight.host_ram_gib - 8 * one.host_ram_gib) < 1


def test_expert_shares_go_by_whole_solve_batches():
    from mtpquant.calib.plan import expert_shares, model_config

    quant = load("quant", "w4a16-asym-g128")
    shape = shape_from_config(model_config(load("models", "glm-5.2"), "glm-5.2"))
    down, gate_up = expert_shares(shape, quant, 8)
    assert down == 42 / 256  # 131072 // 6144 = 21 a batch, 13 batches: 2 on some rank
    assert gate_up == 1 / 8  # 131072 // 2048 = 64 Linears (32 experts) a batch: one each
    assert expert_shares(shape, quant, 1) == (1.0, 1.0)


def test_stream_plan_scales_io_with_the_given_disk_floor(capsys):
    args = ("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128", GPUSpec.of("h200", 8))
    slow = make_plan(*args, engine="stream")
    from mtpquant.calib.plan import STREAM_RATES_FLOOR_GBPS as floor  # the floor the rates were measured at

    fast = make_plan(*args, engine="stream", disk_gbps=(floor[0] * 10, floor[1] * 4))
    assert abs(fast.stream["read_s"] - slow.stream["read_s"] / 10) < 0.2
    assert abs(fast.stream["write_s"] - slow.stream["write_s"] / 4) < 0.2
    assert fast.stream["gpu_s"] == slow.stream["gpu_s"] and fast.seconds["total"] < slow.seconds["total"]
    assert fast.stream["rates_gbps"]["disk_floor_given"] and "extrapolated" in " ".join(fast.notes)
    with pytest.raises(MtpquantError, match="--disk-gbps: models the stream engine"):
        make_plan(*args, engine="memory", disk_gbps=(10, 10))
    assert main(["plan", "--model", "glm-5.2", "--calibration", "glm5-code-instruct", "--disk-gbps", "12"]) == 2
    assert "--disk-gbps: expected READ,WRITE in GB/s" in capsys.readouterr().err


def test_cli_plan_stream_json(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "glm-5.2", "--calibration", "glm5-code-instruct", "--gpus", "1",
                 "--host-ram-gib", "128", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["engine"] == "stream" and plan["stream"]["resume_worst_s"] > 0


def test_expert_split_rank_holds_only_its_down_hessians():
    """Under the expert split a rank forms only its share's down_proj Hessians (ExpertLayer.owned): GLM-5.2's
    rank with 42 of 256 experts holds 42/256 of them beside the shared gate/up Hessian, and its GPU peak is
    lower by the rest."""
    from mtpquant.calib.plan import FP32, GIB, model_config

    shape = shape_from_config(model_config(load("models", "glm-5.2"), "glm-5.2"))
    args = ("glm-5.2", "glm5-code-instruct", "w4a16-asym-g128")
    one = make_plan(*args, GPUSpec.of("h200", 1), engine="stream").subgraphs[1]
    eight = make_plan(*args, GPUSpec.of("h200", 8), engine="stream").subgraphs[1]
    h, i, e = shape.hidden, shape.moe_inter, shape.experts
    assert one.parts_gib["hessians"] == pytest.approx(FP32 * (h * h + e * i * i) / GIB, abs=0.01)
    assert eight.parts_gib["hessians"] == pytest.approx(FP32 * (h * h + 42 * i * i) / GIB, abs=0.01)
    assert one.gpu_peak_gib - eight.gpu_peak_gib == pytest.approx(FP32 * (e - 42) * i * i / GIB, abs=0.02)
    assert "one rank of 8" in eight.name
