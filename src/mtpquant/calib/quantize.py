"""`quantize`: GPTQ on the routed experts with llm-compressor (the recipe's scheme), every expert calibrated.

Loads the BF16 checkpoint (which drops the MTP layer: `inject-mtp` puts it back), linearizes the fused
experts into per-expert Linears, refuses any target that would match anything but a routed expert
(MTP layers included, checked against the on-disk names), runs `oneshot`, saves compressed, and
restores any tensor whose dtype the save changed (FP32 router biases have been seen downcast).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_dir
from mtpquant.core.checkpoint import Checkpoint
from mtpquant.core.errors import MtpquantError
from mtpquant.core.measure import peak_memory
from mtpquant.model import recipes
from mtpquant.model.families import Family, family_for, matches
from mtpquant.model.recipes import ROUTED_EXPERTS, QuantRecipe

FEW_TOKENS_FRACTION = 0.1  # an expert routed < 10% of its uniform share is flagged in the report
# fast_experts.activations: auto keeps the activation cache on the GPU when it takes at most this share of
# the card (a GLM-5.2 layer's fast calibration peaks at ~43 GiB of an H100's 79: CALIB_SPEED.md run C)
ACTIVATIONS_GPU_FRACTION = 0.15


def resolve_targets(recipe: QuantRecipe, fam: Family, config: dict[str, Any]) -> list[str]:
    return [fam.routed_experts_target(config) if t == ROUTED_EXPERTS else t for t in recipe.gptq.targets]


def refuse_untraceable_sequential_targets(recipe: QuantRecipe, fam: Family, where: str) -> None:
    """GLM-5's sparse-attention indexer picks its top-k keys with data-dependent control flow: per-Linear
    sequential targets cannot trace it (seed write-up). Subgraphs must be whole decoder layers."""
    if not fam.has_indexer:
        return
    for t in recipe.sequential_targets or []:
        if not t.endswith("DecoderLayer"):
            raise MtpquantError(f"{where}: sequential_targets: {t!r} splits the decoder layer; {fam.model_type}'s "
                                "indexer cannot be traced below a whole layer (use null or a *DecoderLayer class)")


def refuse_non_expert_targets(targets: list[str], names: list[str], fam: Family, config: dict[str, Any],
                              where: str) -> int:
    """Every name a target matches must be a routed expert outside the MTP layers; returns the match count."""
    hits = 0
    for name in names:
        for t in targets:
            if matches(t, name):
                kind = fam.classify(name, config)
                if kind != "routed_expert":
                    raise MtpquantError(f"{where}: target {t!r} matches {name} ({kind}); only routed experts "
                                        "may be quantized")
                hits += 1
                break
    if hits == 0:
        raise MtpquantError(f"{where}: the targets match no Linear of this model")
    return hits


def modifier_for(recipe: QuantRecipe, targets: list[str]) -> Any:
    """llm-compressor's GPTQModifier, or with a `fast_experts` section its subclass ExpertGPTQModifier."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    common = dict(
        config_groups={"group_0": recipe.scheme.config_group(targets, recipe.gptq.actorder)},
        ignore=list(recipe.gptq.ignore),
        block_size=recipe.gptq.block_size,
        dampening_frac=recipe.gptq.dampening_frac,
    )
    fast = recipe.fast_experts
    if fast is None:
        return GPTQModifier(**common)
    from mtpquant.calib.expert_gptq import ExpertGPTQModifier

    return ExpertGPTQModifier(**common, hessian_inputs=fast.hessian_inputs, token_chunk=fast.token_chunk,
                              solve_rows=fast.solve_rows, routed_forward=fast.routed_forward,
                              overlap_weights=fast.overlap_weights)


def activation_cache_bytes(hidden: int, samples: int, seq_len: int) -> int:
    """The sequential pipeline's activation cache: one bf16 hidden state per token (its largest entry; the
    rotary tables and masks it also holds are counted by the 25% margin)."""
    return int(1.25 * samples * seq_len * hidden * 2)


def activation_bytes(config: dict[str, Any], samples: int, seq_len: int) -> int:
    """activation_cache_bytes of a model's config.json (its family reads the hidden size)."""
    return activation_cache_bytes(family_for(config).hidden_size(config), samples, seq_len)


def activation_device(recipe: QuantRecipe, cache_bytes: int, gpu: Any = None) -> str:
    """`sequential_offload_device` for oneshot: "cpu" (llm-compressor's default), or the execution device when
    `fast_experts.activations` is "gpu", or "auto" and the cache takes at most ACTIVATIONS_GPU_FRACTION of
    the card. `gpu`: (device name, total bytes); None asks torch (no accelerator: "cpu")."""
    fast = recipe.fast_experts
    mode = fast.activations if fast else "cpu"
    if mode == "cpu":
        return "cpu"
    if gpu is None:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        gpu = (f"cuda:{torch.cuda.current_device()}", torch.cuda.mem_get_info()[1])
    name, total = gpu
    if mode == "auto" and cache_bytes > ACTIVATIONS_GPU_FRACTION * total:
        return "cpu"
    return name


def oneshot_options(recipe: QuantRecipe, offload_device: str = "cpu") -> dict[str, Any]:
    """Pipeline options for `oneshot`. With `fast_experts` the modifier itself runs every expert on every
    token for its Hessians, so the model's forward only routes (llm-compressor's all-experts forward would
    compute the same expert outputs a second time and throw them away). `offload_device`: where the
    activations wait between subgraphs (activation_device)."""
    fast = recipe.fast_experts
    return dict(
        pipeline=recipe.pipeline, sequential_targets=recipe.sequential_targets,
        moe_calibrate_all_experts=recipe.moe_calibrate_all_experts and fast is None,
        sequential_prefetch=bool(fast and fast.sequential_prefetch),
        sequential_offload_device=offload_device,
    )


@dataclass
class GPTQRecorder:
    """Collects llm-compressor's per-module GPTQ loss and time through its CompressionLogger hook."""

    names: dict[Any, str]
    on_module: Any = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def logger_class(self) -> type:
        from llmcompressor.utils.metric_logging import CompressionLogger

        recorder = self

        class RecordingLogger(CompressionLogger):
            def __exit__(self, *exc: Any) -> None:
                super().__exit__(*exc)
                recorder.rows.append({"module": recorder.names.get(self.module, "?"), "loss": self._loss,
                                      "seconds": round(time.time() - self.start_tick, 4)})
                if recorder.on_module:
                    recorder.on_module()

        return RecordingLogger


@contextlib.contextmanager
def recording_gptq(model: Any, on_module: Any = None) -> Iterator[GPTQRecorder]:
    import llmcompressor.modifiers.gptq.base as gptq_base

    rec = GPTQRecorder({m: n for n, m in model.named_modules()}, on_module)
    original = gptq_base.CompressionLogger
    gptq_base.CompressionLogger = rec.logger_class()
    try:
        yield rec
    finally:
        gptq_base.CompressionLogger = original
        # the logger class closes over `rec`, and a class sits in a reference cycle (every class does): `names`
        # (every module of the model) lived until the cyclic GC ran. In the stream engine that kept each
        # finished layer's packed weights on the GPU (+0.98 GiB per 32-expert layer on the H200)
        rec.names, rec.on_module = {}, None


@contextlib.contextmanager
def routing_counts(model: Any, fam: Family, config: dict[str, Any]) -> Iterator[dict[int, Any]]:
    """Tokens the router sent to each expert, per MoE layer (top-k choices, over all forward passes)."""
    import torch

    counts: dict[int, Any] = {}
    handles = []
    for layer in fam.moe_layers(config):
        gate = model.get_submodule(fam.router_module(layer))
        counts[layer] = torch.zeros(fam.num_experts(config), dtype=torch.long)

        def hook(_mod: Any, _inp: Any, out: Any, layer: int = layer) -> None:
            idx = out[-1] if isinstance(out, tuple) else out
            counts[layer] += torch.bincount(idx.reshape(-1).cpu(), minlength=counts[layer].numel())

        handles.append(gate.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def few_token_experts(counts: dict[int, Any], top_k: int) -> list[dict[str, Any]]:
    out = []
    for layer, c in counts.items():
        total = int(c.sum())
        if total == 0:
            continue
        uniform = total / c.numel()
        for e, n in enumerate(c.tolist()):
            if n < FEW_TOKENS_FRACTION * uniform:
                out.append({"layer": layer, "expert": e, "routed": n, "uniform_share": round(uniform, 1)})
    return out


def restore_dtypes(out_dir: Path, source: Checkpoint) -> list[str]:
    """Rewrite tensors whose dtype differs from the source's (unquantized ones only), bytes from the source."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = Checkpoint(out_dir)
    src = source.tensors
    by_shard: dict[str, list[str]] = {}
    for name, info in out.tensors.items():
        if name in src and src[name].dtype != info.dtype:
            by_shard.setdefault(out.weight_map[name], []).append(name)
    for shard, names in by_shard.items():
        tensors = load_file(str(out_dir / shard))
        for name in names:
            with safe_open(str(src[name].shard), "pt") as fh:
                tensors[name] = fh.get_tensor(name)
        save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
    return sorted(n for names in by_shard.values() for n in names)


def checked_inputs(model_dir: Path, quant_ref: str, calib_ref: str) -> tuple[
        Checkpoint, dict[str, Any], Family, Path, Path, QuantRecipe, Any, list[str]]:
    """What both engines read and refuse before any weight loads: the source checkpoint, its config and family,
    the recipes (paths and parsed) and the resolved targets, checked against the names on disk."""
    source = Checkpoint(model_dir)
    config = source.config
    fam = family_for(config, str(source.root / "config.json"))
    qpath, cpath = recipes.resolve_path("quant", quant_ref), recipes.resolve_path("calibration", calib_ref)
    recipe: QuantRecipe = recipes.load("quant", qpath)
    calib = recipes.load("calibration", cpath)
    targets = resolve_targets(recipe, fam, config)
    on_disk = [n.removesuffix(".weight") for n in source.tensors if n.endswith(".weight")]
    refuse_non_expert_targets(targets, on_disk, fam, config, str(qpath))
    refuse_untraceable_sequential_targets(recipe, fam, str(qpath))
    return source, config, fam, qpath, cpath, recipe, calib, targets


def quantize(model_dir: Path, quant_ref: str, calib_ref: str, out_dir: Path) -> dict[str, Any]:
    import torch
    import transformers
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from mtpquant.calib import ranks

    t0 = time.perf_counter()
    rank = ranks.init()
    source, config, fam, qpath, cpath, recipe, calib, targets = checked_inputs(model_dir, quant_ref, calib_ref)

    from llmcompressor import oneshot

    from mtpquant.calib.calibration import build_dataset

    tokenizer = transformers.AutoTokenizer.from_pretrained(source.root)
    # the calibration set before the model: a mismatch with the tokenizer costs seconds, not a model load
    dataset, data_summary = build_dataset(calib, tokenizer, str(cpath))
    model = ranks.load_model(getattr(transformers, fam.architecture), source.root, torch.bfloat16)
    ranks.linearize(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    expected = fam.routed_expert_linears(config)
    n_hits = refuse_non_expert_targets(targets, linears, fam, config, str(qpath))
    if n_hits != len(expected):
        raise MtpquantError(f"{qpath}: targets match {n_hits} Linears, expected {len(expected)} routed experts")
    dataset = ranks.my_samples(dataset)
    t_load = time.perf_counter()

    progress = Progress(TextColumn("[bold]GPTQ[/] {task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} Linears"), TimeElapsedColumn())
    task = progress.add_task(fam.architecture, total=len(expected))
    modifier = modifier_for(recipe, targets)
    act_device = activation_device(recipe, activation_bytes(config, len(dataset), calib.max_seq_length))
    with progress, recording_gptq(model, lambda: progress.advance(task)) as rec, \
            routing_counts(model, fam, config) as counts:
        oneshot(
            model=model, processor=tokenizer, dataset=dataset, recipe=modifier,
            **oneshot_options(recipe, act_device),
            num_calibration_samples=len(dataset), max_seq_length=calib.max_seq_length,
            shuffle_calibration_samples=False,
        )
    t_calib = time.perf_counter()
    # under torchrun each rank logged the Linears it solved and routed its share of the samples
    rows = [r for part in ranks.gather(rec.rows) for r in part]
    per_rank = ranks.gather(counts)
    counts = {k: sum(c[k] for c in per_rank) for k in counts}
    restored: list[str] = []
    if rank == 0:
        with atomic_dir(Path(out_dir)) as tmp:
            ranks.share(str(tmp))
            model.save_pretrained(tmp, save_compressed=True)  # under torchrun: compressed by all ranks
            tokenizer.save_pretrained(tmp)
            restored = restore_dtypes(tmp, source)
    else:
        model.save_pretrained(ranks.share(None), save_compressed=True)  # rank 0 writes
    ranks.barrier()
    t_save = time.perf_counter()

    losses = [r["loss"] for r in rows if r["loss"] is not None]
    report = {
        "stage": "quantize", "engine": "memory",
        "model": str(source.root), "family": fam.model_type, "output": str(out_dir),
        "recipe": {"path": str(qpath), "sha256": recipes.recipe_sha256("quant", qpath), "targets": targets},
        "calibration": {"path": str(cpath), "sha256": recipes.recipe_sha256("calibration", cpath), **data_summary},
        "activations_on": act_device,
        "quantized_linears": len(rows), "expected_linears": len(expected), "ranks": ranks.world(),
        "gptq_loss_median": statistics.median(losses) if losses else None,
        "gptq_loss_max": max(losses) if losses else None,
        "few_token_experts": few_token_experts(counts, fam.experts_per_token(config, default=1)),
        "routing_counts": {str(k): v.tolist() for k, v in counts.items()},
        "dtype_restored": restored,
        "seconds": {"load": round(t_load - t0, 2), "calibrate_and_solve": round(t_calib - t_load, 2),
                    "save": round(t_save - t_calib, 2), "total": round(t_save - t0, 2)},
        "memory": peak_memory(),
        "per_linear": rows,
        "rank": rank,
    }
    if modifier_timings := getattr(modifier, "timings", None):
        report["seconds"]["expert_gptq"] = {k: round(v, 2) for k, v in modifier_timings.items()}
    if len(rows) != len(expected):
        raise MtpquantError(f"GPTQ compressed {len(rows)} Linears, expected {len(expected)}")
    return report
