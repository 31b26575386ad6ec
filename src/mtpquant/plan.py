"""`mtpquant plan`: before renting GPUs, predict what quantizing a model will need, and refuse what cannot fit.

Inputs: a model recipe (its dimensions: the fixture spec, a local config.json, or the recipe's `config`
section for a hub model not downloaded yet), a calibration recipe (samples x tokens), the quant recipe
(fast_experts or not) and a GPU spec (type, count, memory). Outputs, per rank: peak GPU memory of each
kind of subgraph, host RAM, disk (source, offload, output) and wall time split into load / calibration /
solve / save. Pure arithmetic on counts from mtpquant.calib_cost and rates measured on this workplace's
H100 and H200 machines (benchmarks/CALIB_SPEED.md says which run gave each number).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtpquant import recipes
from mtpquant.calib_cost import BF16, FP32, MoEShape
from mtpquant.errors import MtpquantError
from mtpquant.recipes import CalibrationRecipe, ModelRecipe, QuantRecipe

GIB = 2**30


@dataclass(frozen=True)
class GPUType:
    """Usable memory and the rates the time model needs, as measured here (see CALIB_SPEED.md)."""

    memory_gib: float  # what torch can allocate on one card
    bf16_tflops: float  # achieved by the all-experts Hessian pass (large bf16 GEMMs)
    fp32_tflops: float  # achieved by llm-compressor's FP32 Hessian matmuls
    solve_tflops: float  # GPTQ block updates and factorizations (FP32)
    h2d_gbps: float  # pageable host <-> device copies (layer onload and write-back)
    call_overhead_s: float  # per forward call of a MoE layer (Python loop over experts), per pass


GPU_TYPES: dict[str, GPUType] = {
    "h100": GPUType(memory_gib=79.1, bf16_tflops=560.0, fp32_tflops=48.0, solve_tflops=30.0, h2d_gbps=10.0,
                    call_overhead_s=0.02),
    "h200": GPUType(memory_gib=139.7, bf16_tflops=560.0, fp32_tflops=48.0, solve_tflops=30.0, h2d_gbps=10.0,
                    call_overhead_s=0.02),
}
# Host side, measured on the benchmark machines (load and save of a GLM-5.2-shaped checkpoint).
LOAD_GBPS = 1.0  # source checkpoint -> linearized model on CPU
SAVE_GBPS = 0.5  # compressed save (packing + writing), per GB of BF16 input
RESERVED_GPU_GIB = 1.0  # CUDA context, allocator slack beyond the counted tensors
HOST_RESERVED_GIB = 16.0  # Python, libraries, tokenizer, per process
GIB_MARGIN = 0.95  # refuse a plan that needs more than this share of a card


@dataclass(frozen=True)
class GPUSpec:
    type: str
    count: int
    memory_gib: float

    @staticmethod
    def of(type_: str, count: int, memory_gib: float | None = None) -> GPUSpec:
        if type_ not in GPU_TYPES:
            raise MtpquantError(f"--gpu: unknown GPU type {type_!r} (known: {', '.join(GPU_TYPES)})")
        if count < 1:
            raise MtpquantError("--gpus: must be at least 1")
        return GPUSpec(type_, count, memory_gib or GPU_TYPES[type_].memory_gib)

    @property
    def rates(self) -> GPUType:
        return GPU_TYPES[self.type]


@dataclass
class Subgraph:
    name: str
    count: int
    gpu_peak_gib: float
    parts_gib: dict[str, float]
    calibration_s: float = 0.0
    solve_s: float = 0.0


@dataclass
class Plan:
    model: str
    gpus: str
    tokens: int
    path: str  # "fast" (fast_experts) or "baseline" (llm-compressor's GPTQModifier)
    subgraphs: list[Subgraph]
    gpu_peak_gib: float
    host_ram_gib: float
    disk_gib: dict[str, float]
    seconds: dict[str, float]
    refusals: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- inputs -------------------------------------------------------------------------------------------


def model_config(model: ModelRecipe, where: str) -> dict[str, Any]:
    """config.json of the model a recipe names: fixture spec, local checkpoint, or the recipe's `config`."""
    src = model.source
    if src.fixture is not None:
        from mtpquant.fixture import config_for

        cfg = config_for(model.family, src.fixture).to_dict()
        cfg["num_nextn_predict_layers"] = src.fixture.num_nextn_predict_layers
        return cfg
    if src.path is not None and (Path(src.path) / "config.json").is_file():
        return json.loads((Path(src.path) / "config.json").read_text())
    if model.config:
        return {"model_type": model.family, **model.config}
    raise MtpquantError(f"{where}: no dimensions for this model: add a `config` section (the config.json fields) "
                        "or point source.path at a downloaded checkpoint")


def tokens_of(calib: CalibrationRecipe) -> int:
    """Upper bound: every sample at max_seq_length (shorter samples only make the run cheaper)."""
    return calib.num_samples * calib.max_seq_length


# ---- memory -------------------------------------------------------------------------------------------


def moe_layer_memory(s: MoEShape, fast: bool, seq_len: int, token_chunk: int, solve_rows: int) -> dict[str, float]:
    """Bytes on one GPU while one MoE decoder layer calibrates and solves, by part."""
    h, i, e = s.hidden, s.moe_inter, s.experts
    weights = BF16 * s.moe_layer_params
    forward = attention_bytes(s, seq_len)
    if fast:
        hessians = FP32 * (h * h + e * i * i)
        n = token_chunk + seq_len  # the buffer fills past token_chunk by up to one sample
        calib = BF16 * n * h * 2 + BF16 * n * i * 6 + FP32 * (h * h + i * i)
        down_batch = max(1, solve_rows // h)
        down = down_batch * FP32 * (2 * i * i + 3 * h * i + 4 * h * 128)
        rows = max(1, solve_rows // i) * i
        gate_up = rows * h * (BF16 + 3 * FP32) + 3 * FP32 * h * h
        solve = max(down, gate_up)
        work = max(calib + forward, solve)
    else:
        hessians = FP32 * e * (2 * h * h + i * i)
        work = forward + BF16 * seq_len * (h + 2 * i) * 4 + FP32 * seq_len * h * 2
    return {"weights": weights / GIB, "hessians": hessians / GIB, "working": work / GIB}


def attention_bytes(s: MoEShape, seq_len: int) -> float:
    """Activations of one sample's forward through a decoder layer (eager attention: scores and softmax
    per head, the indexer's scores), plus the layer input/output."""
    heads = max(1, s.attn_params // (s.hidden * 1024))  # not exact; dominated by the L² terms below
    scores = seq_len * seq_len * (BF16 + FP32) * min(heads, 64)
    return scores + BF16 * seq_len * s.hidden * 8


# ---- the plan ----------------------------------------------------------------------------------------


def make_plan(model_ref: str, calib_ref: str, quant_ref: str, gpu: GPUSpec, host_ram_gib: float | None = None,
              disk_gib: float | None = None) -> Plan:
    from mtpquant.calib_cost import shape_from_config

    mpath = recipes.resolve_path("models", model_ref)
    model: ModelRecipe = recipes.load("models", mpath)
    calib: CalibrationRecipe = recipes.load("calibration", calib_ref)
    quant: QuantRecipe = recipes.load("quant", quant_ref)
    shape = shape_from_config(model_config(model, str(mpath)))
    return plan_for_shape(model.name, shape, calib.num_samples, calib.max_seq_length, quant, gpu,
                          host_ram_gib, disk_gib)


def plan_for_shape(name: str, s: MoEShape, samples: int, seq_len: int, quant: QuantRecipe, gpu: GPUSpec,
                   host_ram_gib: float | None = None, disk_gib: float | None = None) -> Plan:
    fast = quant.fast_experts is not None
    fe = quant.fast_experts
    r = gpu.rates
    world = gpu.count
    tokens = samples * seq_len
    tok_rank = math.ceil(samples / world) * seq_len
    calls_rank = math.ceil(samples / world)

    mem = moe_layer_memory(s, fast, seq_len, fe.token_chunk if fe else 0, fe.solve_rows if fe else 0)
    moe_peak = sum(mem.values()) + RESERVED_GPU_GIB
    flops = sum((s.fast_calib_flops() if fast else s.baseline_calib_flops()).values())
    if fast:
        t_calib = tok_rank * flops / (r.bf16_tflops * 1e12)
    else:
        fp32 = s.baseline_calib_flops()["hessians_fp32"]
        t_calib = tok_rank * (fp32 / (r.fp32_tflops * 1e12) + (flops - fp32) / (r.bf16_tflops * 1e12))
    onload = BF16 * s.moe_layer_params / (r.h2d_gbps * 1e9)
    t_calib += onload + 2 * calls_rank * r.call_overhead_s
    solve_flops = sum(s.solve_flops(fast).values())
    expert_bytes = BF16 * s.experts * s.expert_params
    t_solve = solve_flops / world / (r.solve_tflops * 1e12) + expert_bytes / (r.h2d_gbps * 1e9)
    moe = Subgraph("MoE decoder layer", s.moe_layers, round(moe_peak, 2), {k: round(v, 2) for k, v in mem.items()},
                   round(t_calib, 2), round(t_solve, 2))
    dense_w = BF16 * s.dense_layer_params / GIB
    dense_peak = dense_w + attention_bytes(s, seq_len) / GIB + RESERVED_GPU_GIB
    t_dense = (2 * tok_rank * 2.0 * s.dense_layer_params / (r.bf16_tflops * 1e12)
               + BF16 * s.dense_layer_params / (r.h2d_gbps * 1e9) + 2 * calls_rank * 0.002)
    dense = Subgraph("dense decoder layer", s.dense_layers, round(dense_peak, 2),
                     {"weights": round(dense_w, 2)}, round(t_dense, 2), 0.0)

    src_gib = s.bf16_bytes() / GIB
    model_gib = s.bf16_bytes(with_mtp=False) / GIB
    out_gib = s.quantized_bytes() / GIB
    cache_gib = samples * seq_len * s.hidden * BF16 * 2 / GIB
    host = model_gib + cache_gib + HOST_RESERVED_GIB * world
    offload = max(0.0, host - host_ram_gib) if host_ram_gib else 0.0
    seconds = {
        "load": s.bf16_bytes(with_mtp=False) / (LOAD_GBPS * 1e9),
        "calibration": s.moe_layers * t_calib + s.dense_layers * t_dense,
        "solve": s.moe_layers * t_solve,
        "save": s.bf16_bytes(with_mtp=False) / (SAVE_GBPS * 1e9),
    }
    seconds["total"] = sum(seconds.values())
    plan = Plan(name, f"{world}x{gpu.type} ({gpu.memory_gib:g} GiB)", tokens, "fast" if fast else "baseline",
                [dense, moe], round(max(moe_peak, dense_peak), 2), round(host, 1),
                {"source": round(src_gib, 1), "offload": round(offload, 1), "output": round(out_gib, 1)},
                {k: round(v, 1) for k, v in seconds.items()})
    limit = gpu.memory_gib * GIB_MARGIN
    if plan.gpu_peak_gib > limit:
        biggest = max(mem, key=mem.get)
        plan.refusals.append(f"a MoE layer needs {plan.gpu_peak_gib:.1f} GiB per GPU (largest part: {biggest} "
                             f"{mem[biggest]:.1f} GiB) but a {gpu.type} has {gpu.memory_gib:g} GiB")
    if disk_gib is not None and sum(plan.disk_gib.values()) > disk_gib:
        plan.refusals.append(f"needs {sum(plan.disk_gib.values()):.0f} GiB of disk (source "
                             f"{src_gib:.0f}, offload {offload:.0f}, output {out_gib:.0f}) but {disk_gib:g} GiB given")
    return plan


def refuse(plan: Plan) -> None:
    if plan.refusals:
        raise MtpquantError(f"plan refused for {plan.model} on {plan.gpus}: {'; '.join(plan.refusals)}")


def render(plan: Plan) -> Any:
    from rich.table import Table

    t = Table(title=f"plan: {plan.model} on {plan.gpus}, {plan.tokens:,} calibration tokens, {plan.path} GPTQ")
    for c in ("subgraph", "count", "GPU peak GiB/rank", "parts GiB", "calib s each", "solve s each"):
        t.add_column(c, justify="right")
    for sg in plan.subgraphs:
        parts = ", ".join(f"{k} {v:g}" for k, v in sg.parts_gib.items())
        t.add_row(sg.name, str(sg.count), f"{sg.gpu_peak_gib:.1f}", parts, f"{sg.calibration_s:.1f}",
                  f"{sg.solve_s:.1f}")
    sec = plan.seconds
    t.caption = (f"host RAM {plan.host_ram_gib:.0f} GiB; disk: source {plan.disk_gib['source']:.0f} + offload "
                 f"{plan.disk_gib['offload']:.0f} + output {plan.disk_gib['output']:.0f} GiB; wall time "
                 f"{sec['total'] / 3600:.2f} h (load {sec['load'] / 60:.0f} min, calibration "
                 f"{sec['calibration'] / 60:.0f} min, solve {sec['solve'] / 60:.0f} min, "
                 f"save {sec['save'] / 60:.0f} min)")
    return t
