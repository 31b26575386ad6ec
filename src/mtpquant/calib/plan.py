"""`mtpquant plan`: before renting GPUs, predict what quantizing a model will need, and refuse what cannot fit.

Inputs: a model recipe (its dimensions: the fixture spec, a local config.json, or the recipe's `config`
section for a hub model not downloaded yet), a calibration recipe (samples x tokens), the quant recipe
(fast_experts or not) and a GPU spec (type, count, memory). Outputs, per rank: peak GPU memory of each
kind of subgraph, host RAM, disk (source, offload, output) and wall time split into load / calibration /
solve / save. Pure arithmetic on counts from mtpquant.calib.calib_cost and rates measured on this workplace's
H100 and H200 machines (benchmarks/CALIB_SPEED.md says which run gave each number).

`fast_experts.activations` (on the GPU) and `overlap_weights` add their GPU memory (the activation cache;
the next layer's weights). Activations on the GPU also remove the pageable activation copies from the time
(run D, CALIB_SPEED.md); `overlap_weights` gained nothing on oneshot in run D, so its time is not modelled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtpquant.calib.calib_cost import BF16, FP32, MoEShape
from mtpquant.calib.ranks import batch_owners, down_batch, rows_batch
from mtpquant.core.errors import MtpquantError
from mtpquant.model import recipes
from mtpquant.model.families import family_for
from mtpquant.model.recipes import CalibrationRecipe, ModelRecipe, QuantRecipe

GIB = 2**30


@dataclass(frozen=True)
class GPUType:
    """Usable memory and the rates the time model needs, as measured here (CALIB_SPEED.md, runs A-C)."""

    memory_gib: float  # what torch can allocate on one card
    bf16_tflops: float = 600.0  # the all-experts Hessian pass: 595-605 TFLOP/s in runs A-C (H100)
    fp32_tflops: float = 50.0  # llm-compressor's FP32 Hessian matmuls (run B baseline)
    gemm_fp32_tflops: float = 40.0  # GPTQ block updates
    factor_tflops: float = 15.0  # Cholesky factorizations (run B baseline solve)
    h2d_gbps: float = 2.2  # pageable layer onload and write-back (run B; the x4 host of run C did ~5)


# H200: the H100's rates, fitted on H100 runs A-C, predicted run D's 12 H200 points within 0.87-1.08 (time).
GPU_TYPES: dict[str, GPUType] = {"h100": GPUType(memory_gib=79.1), "h200": GPUType(memory_gib=139.7)}
# Per-token and per-call costs of the sequential pipeline's forward passes (runs B and C, fitted in
# CALIB_SPEED.md): activations to and from the CPU, attention, Python per call.
MOE_FWD_S_PER_TOKEN = 3.8e-6  # one pass through a MoE decoder layer (routed experts, attention)
MOE_FWD_S_PER_CALL = 9.0e-3
MOE_FWD_S_PER_EXPERT_CALL = 0.29e-3  # routed forward without grouped GEMMs: per expert, per call
DENSE_FWD_S_PER_TOKEN = 14e-6  # one pass through a dense decoder layer
EMBED_FWD_S_PER_TOKEN = 8e-6
# Activations kept on the GPU (fast_experts.activations) skip the pageable copies of each sample's hidden
# states between the CPU cache and the GPU: per rank, one copy of tokens x hidden bf16 per MoE-layer pass
# (calibration and propagation), one per dense layer and one after the embeddings. Run D (H200 x4 host):
# a MoE pass lost 3.2-3.3 s for 4.8 GB at E=256, 768 x 512 (1.45 GB/s), and the counts match its oneshot
# savings within 7% at three points (CALIB_SPEED.md); fitted there, so not a test of foresight.
ACT_COPY_GBPS = 1.45
# Host side (runs A-D, 20.6 GB GLM-5.2-shaped checkpoint): load+linearize and compressed save. Under torchrun
# (run D, 2 and 4 ranks: load 67-75 s, save 26-28 s) rank 0 copies the model into shared memory once and every
# tensor is broadcast, so both are slower than one process and do not speed up with ranks.
LOAD_GBPS = 1.0
SAVE_GBPS = 1.3
DIST_LOAD_GBPS = 0.29
DIST_SAVE_GBPS = 0.76
RESERVED_GPU_GIB = 2.5  # beyond the counted tensors (allocator, small buffers), fitted on runs A-C
HOST_RESERVED_GIB = 16.0  # Python, libraries, tokenizer, per process
# The memory engine's peak host RSS beyond that, per byte of the BF16 model (transformers' load, llm-compressor's
# linearized experts, the compressed save), measured on the H200: 77.7 GiB for the 31.5 GB 96-expert checkpoint
# (stream_h200_e96_final.json, activations on the GPU: 2.10x) and 89.3 GiB for the 41.2 GB 128-expert one
# (2026-12-01, FACTS: 1.91x). The larger is used: `--engine auto` must not pick an engine that runs out of RAM.
MEMORY_HOST_X = 2.1
GIB_MARGIN = 0.95  # refuse a plan that needs more than this share of a card
# `quantize --engine stream` (mtpquant.calib.stream), engine stream-4, measured on one H200
# (benchmarks/results/stream_h200_flush.json: GLM-5.2-shaped, 1 dense + 3 MoE layers x 32 experts, 2.84 GB per
# MoE layer, 768 x 512 tokens, page cache dropped, three runs; the disk's floor in that call read 1.60, write
# 1.30 GB/s). Reads of a MoE layer while the writer runs: 0.56-1.18 GB/s, 0.93 at the median (9 layers). The
# writer (packed shard + activations file, streamed from the GPU, hashed while written, writeback started every
# 256 MiB): 0.75-1.10 GB/s of the bytes written, 0.92 at the median (12 layers; 0.61 before the writeback
# overlapped the hashing, stream_h200_perf2.json); the pack itself runs on the compute thread (in the GPU work).
# The activations file is the hidden states plus GLM-5's indexer top-k: 1.15x the hidden states.
# Host RSS: the two reused read buffers (the largest layer each) over a base of 4.8 GiB (stream_h200_perf3.json,
# after layer 0's inputs stopped gathering on the host: peak 10.11 GiB there; 9.3 GiB base before).
STREAM_READ_GBPS = 0.93
STREAM_WRITE_GBPS = 0.92
STREAM_RATES_FLOOR_GBPS = (1.597, 1.295)  # the disk floor (read, write) of the call those rates come from
# The stream engine builds a layer on the GPU from its pinned read buffer: a GLM-5.2 MoE layer (256 experts,
# 19.75 GB) in 0.70-0.75 s once the linearized experts are created on the GPU (stream_h200_share_build.json),
# where the memory engine onloads from pageable memory (GPUType.h2d_gbps)
STREAM_H2D_GBPS = 26.0
STREAM_ACTS_FILE_RATIO = 1.15
STREAM_HOST_BASE_GIB = 4.8
# A resume hashes the finished shards and the activations file (the journal's integrity check) and loads the
# activations: the resumed run at layer 2 took 16.6 s more to start than a fresh one for 3.1 GB of shards and
# a 5.55 GB activations file read twice (hash, load): 0.86 GB/s of those bytes. One point.
STREAM_RESUME_GBPS = 0.86
# Several ranks (the stream engine's layer split, layer i on rank i % ranks): the ranks of one node share its
# disk. Its floor, measured in the same H200 call as the rates above (page cache dropped): read 1.15 GB/s,
# write 1.20 GB/s (fsynced). The activations handed from rank to rank: assumed 100 GB/s GPU to GPU (NVLink; not
# measured here, and slower between nodes).
DISK_READ_GBPS = 1.15
DISK_WRITE_GBPS = 1.20
P2P_GBPS = 100.0
ENGINES = ("memory", "stream")


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
    experts_s: float = 0.0  # of calibration_s + solve_s: the all-experts Hessian pass and the solve (per expert)
    onload_s: float = 0.0  # of calibration_s: the layer's weights copied to the GPU from pageable host memory


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
    notes: list[str] = field(default_factory=list)
    engine: str = "memory"  # the quantize engine this plan assumed
    stream: dict[str, Any] = field(default_factory=dict)  # the stream engine's stages, overlap, resume

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- inputs -------------------------------------------------------------------------------------------


def model_config(model: ModelRecipe, where: str) -> dict[str, Any]:
    """config.json of the model a recipe names: fixture spec, local checkpoint, or the recipe's `config`."""
    src = model.source
    if src.fixture is not None:
        from mtpquant.model.families import FAMILIES

        return FAMILIES[model.family].fixture_config(src.fixture)
    if src.path is not None and (Path(src.path) / "config.json").is_file():
        return json.loads((Path(src.path) / "config.json").read_text())
    if model.config:
        from mtpquant.model.families import FAMILIES

        return FAMILIES[model.family].config_from(model.config)
    raise MtpquantError(f"{where}: no dimensions for this model: add a `config` section (the config.json fields) "
                        "or point source.path at a downloaded checkpoint")


def tokens_of(calib: CalibrationRecipe) -> int:
    """Upper bound: every sample at max_seq_length (shorter samples only make the run cheaper)."""
    return calib.num_samples * calib.max_seq_length


# ---- memory -------------------------------------------------------------------------------------------


def moe_layer_memory(s: MoEShape, quant: QuantRecipe, seq_len: int, heads: int,
                     down_share: float = 1.0) -> dict[str, float]:
    """GiB on one GPU while one MoE decoder layer calibrates and solves, by part (the peak phase's).
    `down_share`: the part of the experts whose down_proj Hessians this rank forms (the expert split's
    owners: mtpquant.calib.ranks.batch_owners; a rank allocates only its own)."""
    h, i, e = s.hidden, s.moe_inter, s.experts
    fe = quant.fast_experts
    weights = BF16 * s.moe_layer_params
    forward = attention_bytes(s, seq_len, heads)
    if fe is None:  # llm-compressor: every Linear's Hessian; its solve batches to 75% of what is free
        hessians = FP32 * e * (2 * h * h + i * i)
        return {"weights": weights / GIB, "hessians": hessians / GIB, "working": forward / GIB}
    hessians = FP32 * (h * h + down_share * e * i * i)
    n = fe.token_chunk + seq_len  # the buffer fills past token_chunk by up to one sample
    calib = BF16 * n * h * 2 + BF16 * n * i * 6 + FP32 * (h * h + i * i) + forward
    if fe.routed_forward == "grouped_mm":
        calib += BF16 * e * s.expert_params  # stacked expert weights for the grouped GEMMs
    down = down_batch("auto", fe.solve_rows, h) * FP32 * (2 * i * i + 3 * h * i + 4 * h * 128)
    rows = rows_batch(fe.solve_rows, i) * i
    gate_up = 3 * FP32 * rows * h + 2 * FP32 * h * h  # stacked, permuted, unpermuted rows; H and its factor
    phases = {"calibration": (hessians, calib), "down solve": (hessians, down),
              "gate/up solve": (FP32 * h * h, gate_up)}
    phase = max(phases, key=lambda k: sum(phases[k]))
    held, work = phases[phase]
    return {"weights": weights / GIB, "hessians": held / GIB, "working": work / GIB, "phase": phase}


def attention_bytes(s: MoEShape, seq_len: int, heads: int) -> float:
    """Activations of one sample's forward through a decoder layer: eager attention's scores (bf16) and
    softmax (FP32) per head, the indexer's scores, the layer's inputs and outputs."""
    return seq_len * seq_len * (heads * (BF16 + FP32) + 32 * FP32) + BF16 * seq_len * s.hidden * 8


# ---- the plan ----------------------------------------------------------------------------------------


def make_plan(model_ref: str, calib_ref: str, quant_ref: str, gpu: GPUSpec, host_ram_gib: float | None = None,
              disk_gib: float | None = None, engine: str = "memory",
              disk_gbps: tuple[float, float] | None = None) -> Plan:
    from mtpquant.calib.calib_cost import shape_from_config

    mpath = recipes.resolve_path("models", model_ref)
    model: ModelRecipe = recipes.load("models", mpath)
    calib: CalibrationRecipe = recipes.load("calibration", calib_ref)
    quant: QuantRecipe = recipes.load("quant", quant_ref)
    config = model_config(model, str(mpath))
    shape = shape_from_config(config)
    heads = family_for(config).attention_heads(config, default=64)
    args = (model.name, shape, calib.num_samples, calib.max_seq_length, quant, gpu, host_ram_gib, disk_gib, heads)
    if engine == "auto":  # the stream engine when the memory engine's host RAM does not fit what was given
        engine = "memory" if host_ram_gib is None else auto_engine(plan_for_shape(*args).host_ram_gib, host_ram_gib)
    if engine not in ENGINES:
        raise MtpquantError(f"--engine: unknown engine {engine!r} (known: {', '.join(ENGINES)}, auto)")
    if disk_gbps is not None and engine != "stream":
        raise MtpquantError("--disk-gbps: models the stream engine's I/O (add --engine stream)")
    return stream_plan(*args, disk_gbps=disk_gbps) if engine == "stream" else plan_for_shape(*args)


def activation_copy_s(s: MoEShape, tokens_per_rank: int) -> float:
    """One pageable copy of every calibration token's hidden state (bf16) between the CPU and a GPU."""
    return tokens_per_rank * s.hidden * BF16 / (ACT_COPY_GBPS * 1e9)


def moe_layer_seconds(s: MoEShape, quant: QuantRecipe, r: GPUType, samples: int, seq_len: int,
                      world: int, saved_copy_s: float = 0.0) -> dict[str, float]:
    """Per MoE decoder layer, per rank: calibration pass (onload, Hessians, forward), propagation pass,
    solve (GPTQ and the write-back of the quantized weights to the CPU copy). `saved_copy_s`: the activation
    copy each pass skips when the activations stay on the GPU (activation_copy_s)."""
    fe = quant.fast_experts
    calls = math.ceil(samples / world)
    tokens = calls * seq_len
    onload = BF16 * s.moe_layer_params / (r.h2d_gbps * 1e9)
    fwd = tokens * MOE_FWD_S_PER_TOKEN + calls * MOE_FWD_S_PER_CALL
    fwd = max(0.0, fwd - saved_copy_s)
    if fe is None or fe.routed_forward != "grouped_mm":
        fwd += calls * s.experts * MOE_FWD_S_PER_EXPERT_CALL
    if fe is None:
        f = s.baseline_calib_flops()
        hess = tokens * (f["hessians_fp32"] / (r.fp32_tflops * 1e12)
                         + f["all_experts_forward_x2"] / 2 / (r.bf16_tflops * 1e12))
        fwd += tokens * f["all_experts_forward_x2"] / 2 / (r.bf16_tflops * 1e12)  # all experts, propagation too
    else:
        f = s.fast_calib_flops()
        grams = f["down_hessians"] + f["shared_gate_up_hessian"]
        gram_rate = {"bf16": r.bf16_tflops, "tf32": r.bf16_tflops / 2, "fp32": r.fp32_tflops}[fe.hessian_inputs]
        hess = tokens * (f["all_experts_gate_up"] / (r.bf16_tflops * 1e12) + grams / (gram_rate * 1e12))
    sf = s.solve_flops(fast=fe is not None)
    solve = (sf["block_updates"] / (r.gemm_fp32_tflops * 1e12) + sf["factorizations"] / (r.factor_tflops * 1e12)
             + BF16 * s.experts * s.expert_params / (r.h2d_gbps * 1e9)) / world
    return {"calibration": onload + hess + fwd, "propagation": fwd, "solve": solve, "hessians": hess,
            "onload": onload}


def memory_engine_host_gib(s: MoEShape, samples: int, seq_len: int, cache_on_host: bool, processes: int) -> float:
    """The memory engine's peak host RAM on a node: the model as it loads, linearizes and saves (MEMORY_HOST_X),
    the activation cache where it waits on the host, and each process's own."""
    cache_gib = samples * seq_len * s.hidden * BF16 * 2 / GIB if cache_on_host else 0.0
    return MEMORY_HOST_X * s.bf16_bytes(with_mtp=False) / GIB + cache_gib + HOST_RESERVED_GIB * processes


def auto_engine(memory_need_gib: float, host_ram_gib: float) -> str:
    """`--engine auto` (quantize's default, and plan's): the memory engine, the reference, where its host RAM fits,
    else the stream engine (a few layers' buffers, whatever the model's size)."""
    return "memory" if memory_need_gib <= host_ram_gib else "stream"


def quantize_engine_here(model_dir: Path, quant_ref: str, calib_ref: str) -> tuple[str, str]:
    """`quantize --engine auto`: (the engine for this checkpoint on this node, why in words). The inputs are
    checked first, as quantize checks them (a bad file is a one-line error, not a traceback from here)."""
    import os

    import torch

    from mtpquant.calib.quantize import checked_inputs
    from mtpquant.core.measure import host_ram_gib

    _, config, _, _, _, quant, calib, _ = checked_inputs(model_dir, quant_ref, calib_ref)
    gpu = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None
    return quantize_engine(config, calib, quant, host_ram_gib(), gpu, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def quantize_engine(config: dict[str, Any], calib: CalibrationRecipe, quant: QuantRecipe, host_ram_gib: float,
                    gpu_memory_gib: float | None, processes: int) -> tuple[str, str]:
    """`quantize --engine auto` on a node: (the engine, why in words). `processes`: the ranks on the node."""
    from mtpquant.calib.calib_cost import shape_from_config
    from mtpquant.calib.quantize import activation_cache_bytes, activation_device

    s = shape_from_config(config)
    samples = math.ceil(calib.num_samples / processes)
    cache = activation_cache_bytes(s.hidden, samples, calib.max_seq_length)
    on_host = gpu_memory_gib is None or activation_device(quant, cache, ("cuda", gpu_memory_gib * GIB)) == "cpu"
    need = memory_engine_host_gib(s, calib.num_samples, calib.max_seq_length, on_host, processes)
    engine = auto_engine(need, host_ram_gib)
    verb = "fits" if engine == "memory" else "does not fit"
    return engine, (f"the memory engine needs ~{need:,.0f} GiB of host RAM, which {verb} this node's "
                    f"{host_ram_gib:,.0f} GiB")


def plan_for_shape(name: str, s: MoEShape, samples: int, seq_len: int, quant: QuantRecipe, gpu: GPUSpec,
                   host_ram_gib: float | None = None, disk_gib: float | None = None, heads: int = 64) -> Plan:
    r, world = gpu.rates, gpu.count
    tokens = samples * seq_len
    tok_rank = math.ceil(samples / world) * seq_len
    mem = moe_layer_memory(s, quant, seq_len, heads)
    phase = mem.pop("phase", "calibration")
    fe = quant.fast_experts
    act_gib = 0.0
    if fe is not None and fe.activations != "cpu":  # the activation cache held on the GPU (quantize's rule)
        from mtpquant.calib.quantize import activation_cache_bytes, activation_device

        cache = activation_cache_bytes(s.hidden, math.ceil(samples / world), seq_len)
        if activation_device(quant, cache, ("cuda", gpu.memory_gib * GIB)) != "cpu":
            act_gib = cache / GIB
            mem["activations"] = act_gib
    if fe is not None and fe.overlap_weights and s.moe_layers > 1:  # the next layer's, prefetched meanwhile
        mem["prefetch"] = BF16 * s.moe_layer_params / GIB
    moe_peak = sum(mem.values()) + RESERVED_GPU_GIB
    saved = activation_copy_s(s, tok_rank) if act_gib > 0 else 0.0
    t = moe_layer_seconds(s, quant, r, samples, seq_len, world, saved_copy_s=saved)
    moe = Subgraph(f"MoE decoder layer ({phase})", s.moe_layers, round(moe_peak, 2),
                   {k: round(v, 2) for k, v in mem.items()}, round(t["calibration"] + t["propagation"], 2),
                   round(t["solve"], 2), round(t["hessians"] + t["solve"], 2), round(t["onload"], 2))
    dense_w = BF16 * s.dense_layer_params / GIB
    dense_peak = dense_w + attention_bytes(s, seq_len, heads) / GIB + RESERVED_GPU_GIB + act_gib
    if fe is not None and fe.overlap_weights:  # a dense layer prefetches the next (MoE) layer
        dense_peak += BF16 * s.moe_layer_params / GIB
    t_dense = max(0.0, 2 * tok_rank * DENSE_FWD_S_PER_TOKEN - saved)
    dense = Subgraph("dense decoder layer", s.dense_layers, round(dense_peak, 2),
                     {"weights": round(dense_w, 2)}, round(t_dense, 2), 0.0)

    src_gib = s.bf16_bytes() / GIB
    out_gib = s.quantized_bytes(quant.scheme) / GIB
    host = memory_engine_host_gib(s, samples, seq_len, act_gib == 0, world)
    offload = max(0.0, host - host_ram_gib) if host_ram_gib else 0.0
    load_gbps, save_gbps = (LOAD_GBPS, SAVE_GBPS) if world == 1 else (DIST_LOAD_GBPS, DIST_SAVE_GBPS)
    seconds = {
        "load": s.bf16_bytes(with_mtp=False) / (load_gbps * 1e9),
        "calibration": s.moe_layers * (t["calibration"] + t["propagation"]) + s.dense_layers * t_dense
        + max(0.0, 2 * tok_rank * EMBED_FWD_S_PER_TOKEN - saved),
        "solve": s.moe_layers * t["solve"],
        "save": s.bf16_bytes(with_mtp=False) / (save_gbps * 1e9),
    }
    seconds["total"] = sum(seconds.values())
    fast = quant.fast_experts is not None
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
    if world > 1:  # torchrun's load and save are slower than one process's: say when that outweighs the ranks
        one = plan_for_shape(name, s, samples, seq_len, quant, GPUSpec(gpu.type, 1, gpu.memory_gib), host_ram_gib,
                             disk_gib, heads)
        if not one.refusals and one.seconds["total"] < plan.seconds["total"]:
            plan.notes.append(f"one process on one {gpu.type} is predicted faster ({one.seconds['total'] / 3600:.2f} h "
                              f"against {plan.seconds['total'] / 3600:.2f} h): under torchrun load and save run at "
                              f"{DIST_LOAD_GBPS:g} / {DIST_SAVE_GBPS:g} GB/s against {LOAD_GBPS:g} / {SAVE_GBPS:g}")
    return plan


def refuse(plan: Plan) -> None:
    if plan.refusals:
        raise MtpquantError(f"plan refused for {plan.model} on {plan.gpus}: {'; '.join(plan.refusals)}")


def render(plan: Plan) -> Any:
    from rich.table import Table

    t = Table(title=f"plan: {plan.model} on {plan.gpus}, {plan.tokens:,} calibration tokens, {plan.path} GPTQ, "
                    f"engine {plan.engine}")
    for c in ("subgraph", "count", "GPU peak GiB/rank", "parts GiB", "calib s each", "solve s each"):
        t.add_column(c, justify="right")
    for sg in plan.subgraphs:
        parts = ", ".join(f"{k} {v:g}" for k, v in sg.parts_gib.items())
        t.add_row(sg.name, str(sg.count), f"{sg.gpu_peak_gib:.1f}", parts, f"{sg.calibration_s:.1f}",
                  f"{sg.solve_s:.1f}")
    sec = plan.seconds
    if plan.engine == "stream":
        t.caption = _stream_caption(plan)
        return t
    t.caption = (f"host RAM {plan.host_ram_gib:.0f} GiB; disk: source {plan.disk_gib['source']:.0f} + offload "
                 f"{plan.disk_gib['offload']:.0f} + output {plan.disk_gib['output']:.0f} GiB; wall time "
                 f"{sec['total'] / 3600:.2f} h (load {sec['load'] / 60:.0f} min, calibration "
                 f"{sec['calibration'] / 60:.0f} min, solve {sec['solve'] / 60:.0f} min, "
                 f"save {sec['save'] / 60:.0f} min)" + "".join(f"\nnote: {n}" for n in plan.notes))
    return t


# ---- the stream engine -------------------------------------------------------------------------------


def _with_activations(quant: QuantRecipe, mode: str) -> QuantRecipe:
    import dataclasses

    if quant.fast_experts is None:
        return quant
    return dataclasses.replace(quant, fast_experts=dataclasses.replace(quant.fast_experts, activations=mode))


def overlapped_seconds(gpu: list[float], read: list[float], write: list[float]) -> float:
    """The stream engine's pipeline: layer i computes while layer i+1 is read (one ahead) and layer i-1's
    shard is written (one in flight), so each step lasts the longest of the three; the first read and the
    last write are exposed."""
    n = len(gpu)
    steps = [max(gpu[i], read[i + 1] if i + 1 < n else 0.0, write[i - 1] if i else 0.0) for i in range(n)]
    return read[0] + sum(steps) + write[-1] if n else 0.0


def ranked_seconds(gpu: list[float], read: list[float], write: list[float], ranks: int,
                   disk: list[float], handoff: float) -> float:
    """The stream engine on `ranks` processes (layer i on rank i % ranks): the GPU work stays serial; a rank
    reads its next layer while the ranks before it compute and writes its last one until its next layer has
    computed (`ranks` steps each), so each layer's read and pack+write spread over those steps; the node's disk
    (`disk`: a layer's bytes read and written at the disk's floor) and the activations' handoff to the next
    rank bound every step. The first read and the last write are exposed."""
    n = len(gpu)
    if ranks == 1:
        return overlapped_seconds(gpu, read, write)
    steps = [max(gpu[i] + handoff, read[i] / ranks, write[i] / ranks, disk[i]) for i in range(n)]
    return read[0] + sum(steps) + write[-1] if n else 0.0


def expert_shares(s: MoEShape, quant: QuantRecipe, ranks: int) -> tuple[float, float]:
    """The largest share of a MoE layer's experts one rank handles under the expert split (whole solve batches
    of one process: mtpquant.calib.ranks.batch_owners): (down_proj Hessians and solves, gate/up solves)."""
    fe = quant.fast_experts
    down = batch_owners(s.experts, down_batch("auto", fe.solve_rows, s.hidden), ranks)
    gate_up = batch_owners(2 * s.experts, rows_batch(fe.solve_rows, s.moe_inter), ranks)
    return (max(down.count(r) for r in range(ranks)) / s.experts,
            max(gate_up.count(r) for r in range(ranks)) / (2 * s.experts))


def expert_split_gpu_s(dense: Subgraph, moe: Subgraph, s: MoEShape, quant: QuantRecipe, ranks: int) -> list[float]:
    """Per decoder layer, the GPU seconds of the expert split: every rank repeats what is not per expert (the
    layer's onload, attention, router and routed forward in both passes, the shared gate/up Hessian); the
    all-experts Hessian pass and the solves divide by whole batches; the owners broadcast the solved expert
    weights (bf16, GPU to GPU at P2P_GBPS)."""
    down, gate_up = expert_shares(s, quant, ranks)
    whole = moe.calibration_s + moe.solve_s
    solve = moe.solve_s
    hess = moe.experts_s - solve
    broadcast = BF16 * s.experts * s.expert_params * (1 - 1 / ranks) / (P2P_GBPS * 1e9)
    moe_s = whole - moe.experts_s + hess * down + solve * max(down, gate_up) + broadcast
    return [dense.calibration_s] * s.dense_layers + [moe_s] * s.moe_layers


def _expert_split_memory(moe: Subgraph, s: MoEShape, quant: QuantRecipe, seq_len: int, heads: int,
                         ranks: int) -> None:
    """A MoE layer's GPU peak on one rank of the expert split: its own down_proj Hessians, not all of them."""
    down, _ = expert_shares(s, quant, ranks)
    whole = moe_layer_memory(s, quant, seq_len, heads)
    mine = moe_layer_memory(s, quant, seq_len, heads, down_share=down)
    whole.pop("phase", None)
    moe.name = f"MoE decoder layer ({mine.pop('phase', 'calibration')}, one rank of {ranks})"
    moe.gpu_peak_gib = round(moe.gpu_peak_gib - sum(whole.values()) + sum(mine.values()), 2)
    moe.parts_gib.update({k: round(v, 2) for k, v in mine.items()})


def stream_plan(name: str, s: MoEShape, samples: int, seq_len: int, quant: QuantRecipe, gpu: GPUSpec,
                host_ram_gib: float | None = None, disk_gib: float | None = None, heads: int = 64,
                disk_gbps: tuple[float, float] | None = None) -> Plan:
    """`quantize --engine stream`: the GPU work of the memory engine's model layer by layer on one GPU, the
    reads and pack+writes at the stream engine's measured rates, overlapped as the engine does; host RAM for
    a few layers' buffers and the activations (not the model); disk for the source, the output and two
    activation files at a layer boundary; what a resume costs. Several GPUs (torchrun): the faster of the
    engine's layer split (ranked_seconds) and expert split (expert_split_gpu_s), host RAM for each rank's
    buffers on one node. `disk_gbps`: the node's disk floor (read, write); the engine's rates scale with it
    (an extrapolation from one disk)."""
    from mtpquant.calib.quantize import activation_cache_bytes, activation_device

    ranks, gpu = gpu.count, GPUSpec(gpu.type, 1, gpu.memory_gib)  # per-layer work runs on one GPU
    cache = activation_cache_bytes(s.hidden, samples, seq_len)
    # placed on the GPU only if a layer's inputs and outputs fit at once (mtpquant.calib.stream.device.placement: the
    # writer may still hold the boundary before); the propagation pass drops each batch's inputs as its output
    # is made (stream.calibrate._propagate), so the layer itself holds one set, as the memory engine does
    on_gpu = quant.fast_experts is not None and activation_device(
        quant, 2 * cache, ("cuda", gpu.memory_gib * GIB)) != "cpu"
    base = plan_for_shape(name, s, samples, seq_len, _with_activations(quant, "gpu" if on_gpu else "cpu"), gpu,
                          None, None, heads)
    dense, moe = base.subgraphs
    layer_bytes = [BF16 * s.dense_layer_params] * s.dense_layers + [BF16 * s.moe_layer_params] * s.moe_layers
    moe.calibration_s = round(moe.calibration_s - moe.onload_s + BF16 * s.moe_layer_params / (STREAM_H2D_GBPS * 1e9), 2)
    moe.onload_s = 0.0
    gpu_s = [dense.calibration_s] * s.dense_layers + [moe.calibration_s + moe.solve_s] * s.moe_layers
    floor = disk_gbps or (DISK_READ_GBPS, DISK_WRITE_GBPS)
    read_gbps, write_gbps = STREAM_READ_GBPS, STREAM_WRITE_GBPS
    if disk_gbps is not None:
        read_gbps *= floor[0] / STREAM_RATES_FLOOR_GBPS[0]
        write_gbps *= floor[1] / STREAM_RATES_FLOOR_GBPS[1]
    read = [b / (read_gbps * 1e9) for b in layer_bytes]
    out_bytes_layer = [b - BF16 * s.experts * s.expert_params + s.experts * s.expert_params
                       * quant.scheme.bytes_per_weight if k >= s.dense_layers else b
                       for k, b in enumerate(layer_bytes)]
    acts_file = STREAM_ACTS_FILE_RATIO * cache  # written after every layer but the last
    written = [o + (acts_file if k + 1 < len(out_bytes_layer) else 0) for k, o in enumerate(out_bytes_layer)]
    write = [w / (write_gbps * 1e9) for w in written]
    disk = [b / (floor[0] * 1e9) + w / (floor[1] * 1e9) for b, w in zip(layer_bytes, written,
                                                                                    strict=True)]
    handoff = 2 * cache / (P2P_GBPS * 1e9) if ranks > 1 else 0.0  # the activations sent to the next rank
    layers_s = ranked_seconds(gpu_s, read, write, ranks, disk, handoff)
    split, splits_s = "layers", {"layers": round(layers_s, 1)}
    if ranks > 1 and quant.fast_experts is not None:
        # every rank reads every layer (one disk read per node: the ranks read the same pages at the same time,
        # the page cache serves the others; assumed, not measured); rank 0 writes; the node's disk bounds a step
        split_gpu = expert_split_gpu_s(dense, moe, s, quant, ranks)
        experts_s = overlapped_seconds([max(g, d) for g, d in zip(split_gpu, disk, strict=True)], read, write)
        splits_s["experts"] = round(experts_s, 1)
        if experts_s < layers_s:
            split, layers_s, gpu_s = "experts", experts_s, split_gpu
            _expert_split_memory(moe, s, quant, seq_len, heads, ranks)
    rest = BF16 * s.embed_params
    seconds = {"load": rest / (read_gbps * 1e9),  # the embedding (and the rest, read again at the end)
               "layers": layers_s,
               "save": rest / (read_gbps * 1e9) + rest / (write_gbps * 1e9)}
    seconds["total"] = sum(seconds.values())
    big = max(layer_bytes)
    # the two reused read buffers (layer i in buffer i % 2, each the largest layer's size); the packed layer is
    # streamed from the GPU (two 64 MiB staging buffers); activations on the host: inputs and outputs (pinned)
    host = ranks * (STREAM_HOST_BASE_GIB + (2 * big + (0 if on_gpu else 2) * cache) / GIB)  # one node
    out_gib = s.quantized_bytes(quant.scheme) / GIB
    io = sum(read) + sum(write)
    exposed = layers_s - sum(gpu_s)
    out_bytes = s.quantized_bytes(quant.scheme)
    worst_step = max(max(g, r, w) for g, r, w in zip(gpu_s, read, write, strict=True)) if gpu_s else 0.0
    plan = Plan(name, f"{ranks}x{gpu.type} ({gpu.memory_gib:g} GiB)", samples * seq_len, base.path, [dense, moe],
                round(max(dense.gpu_peak_gib, moe.gpu_peak_gib), 2), round(host, 1),
                {"source": base.disk_gib["source"], "offload": 0.0, "output": round(out_gib, 1),
                 "activations": round(2 * cache / GIB, 1)},
                {k: round(v, 1) for k, v in seconds.items()}, engine="stream")
    plan.stream = {
        "activations_on": "gpu" if on_gpu else "cpu (pinned)",
        "per_layer_s": {"dense": {"gpu": round(gpu_s[0], 2), "read": round(read[0], 2), "write": round(write[0], 2)}
                        if s.dense_layers else None,
                        "moe": {"gpu": round(gpu_s[-1], 2), "read": round(read[-1], 2), "write": round(write[-1], 2)}
                        if s.moe_layers else None},
        "gpu_s": round(sum(gpu_s), 1), "read_s": round(sum(read), 1), "write_s": round(sum(write), 1),
        "io_hidden_s": round(max(0.0, io - exposed), 1), "io_exposed_s": round(max(0.0, exposed), 1),
        "bound_by": max(("gpu", sum(gpu_s)), ("read", sum(read)), ("write", sum(write)), key=lambda x: x[1])[0],
        "rates_gbps": {"read": round(read_gbps, 3), "write": round(write_gbps, 3), "resume": STREAM_RESUME_GBPS,
                       "disk_floor": list(floor), "disk_floor_given": disk_gbps is not None},
        "ranks": ranks, "split": split, "splits_s": splits_s,
        # killed at the last layer: re-hash every finished shard and the activations file, load the activations,
        # redo the layer that was running (at most one step and its write)
        "resume_worst_s": round((out_bytes + 2 * cache) / (STREAM_RESUME_GBPS * 1e9) + worst_step
                                + max(write), 1),
    }
    plan.notes.append("engine stream: one decoder layer at a time from the shards (host RAM does not grow with "
                      "the model); read and write rates from one H200 run of the overlapped engine (32 experts)"
                      + (f", scaled to the given disk floor {floor[0]:g}/{floor[1]:g} GB/s read/write (extrapolated)"
                         if disk_gbps else ""))
    if ranks > 1:
        why = {"layers": f"layer i on rank i % {ranks}: the GPU work stays serial (one GPU's), reads and pack+writes "
                         "spread over the ranks",
               "experts": "every rank runs every layer, the experts' Hessians and solves divided among them, rank 0 "
                          "writes"}
        other = ", ".join(f"--split {k}: {v / 3600:.2f} h" for k, v in splits_s.items() if k != split)
        plan.notes.append(f"{ranks} ranks, `quantize --split {split}` ({why[split]}); bounded by one node's disk "
                          f"floor; host RAM is every rank's on one node; not measured on several GPUs"
                          + (f" ({other} of layers)" if other else ""))
    _refuse_stream(plan, gpu, host_ram_gib, disk_gib)
    return plan


def _refuse_stream(plan: Plan, gpu: GPUSpec, host_ram_gib: float | None, disk_gib: float | None) -> None:
    if plan.gpu_peak_gib > gpu.memory_gib * GIB_MARGIN:
        plan.refusals.append(f"a layer needs {plan.gpu_peak_gib:.1f} GiB on the GPU but a {gpu.type} has "
                             f"{gpu.memory_gib:g} GiB")
    if host_ram_gib is not None and plan.host_ram_gib > host_ram_gib:
        plan.refusals.append(f"the stream engine needs {plan.host_ram_gib:.0f} GiB of host RAM (a few layers and "
                             f"the activations) but {host_ram_gib:g} GiB given")
    need = sum(plan.disk_gib.values())
    if disk_gib is not None and need > disk_gib:
        plan.refusals.append(f"needs {need:.0f} GiB of disk (source {plan.disk_gib['source']:.0f}, output "
                             f"{plan.disk_gib['output']:.0f}, activations {plan.disk_gib['activations']:.0f}) but "
                             f"{disk_gib:g} GiB given")


def _stream_caption(plan: Plan) -> str:
    sec, st, d = plan.seconds, plan.stream, plan.disk_gib
    return (f"host RAM {plan.host_ram_gib:.0f} GiB; disk: source {d['source']:.0f} + output {d['output']:.0f} + "
            f"activations {d['activations']:.0f} GiB; wall time {sec['total'] / 3600:.2f} h: layers "
            f"{sec['layers'] / 60:.0f} min (GPU {st['gpu_s'] / 60:.0f}, read {st['read_s'] / 60:.0f}, write "
            f"{st['write_s'] / 60:.0f} min, {st['io_hidden_s'] / 60:.0f} min of I/O hidden; bound by "
            f"{st['bound_by']}), "
            f"load {sec['load'] / 60:.1f} min, save {sec['save'] / 60:.1f} min; activations on the "
            f"{st['activations_on']}; a resume costs at most {st['resume_worst_s'] / 60:.1f} min"
            + "".join(f"\nnote: {n}" for n in plan.notes))
