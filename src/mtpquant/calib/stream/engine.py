"""`quantize --engine stream`: GPTQ one decoder layer at a time, straight from the source shards, resumable.

The memory engine (mtpquant.calib.quantize) loads the whole BF16 model and hands it to `oneshot`. This engine never
holds more than one decoder layer with real weights:

1. The model skeleton is built on the meta device from config.json; only the embedding (read alone from its
   shard) and the rotary tables get real values. The model's own forward runs up to layer 0, where a catcher
   records what it passes to every decoder layer (hidden states, mask, position embeddings) per batch.
2. For each decoder layer in order: exactly that layer's tensors are read from the shards the index names
   (`safetensors.safe_open`), the layer is built with them and its experts linearized (llm-compressor's
   classes), and the project's modifier (`quantize.modifier_for`: llm-compressor's GPTQModifier or
   ExpertGPTQModifier) runs its lifecycle on it as llm-compressor's SequentialPipeline does for one subgraph:
   a calibration pass with the hooks on, `sequential_epoch_end` (the solve), a propagation pass through the
   quantized layer with the hooks off, under `calibration_forward_context` and `DisableQuantization`.
   The batches are llm-compressor's own (`format_calibration_data`: its sampler and collator).
   compressed-tensors' `ModelCompressor` packs the layer; its shard is written to a temp file and renamed.
3. The embedding, final norm and lm_head are copied from the source; config.json gets `quantization_config`
   from compressed-tensors' own code (`ModelCompressor.update_config` of a meta model carrying the schemes).

Resume: `<out>.work/journal.json` records per finished layer its shard and sha256 and the activations saved
at that boundary (file and sha256), under a fingerprint of every input. A layer counts as finished only once
its journal entry is written (after its shard and activations were renamed into place) and its files still
hash as recorded.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mtpquant.calib.quantize import (
    activation_bytes,
    checked_inputs,
    few_token_experts,
    modifier_for,
)
from mtpquant.calib.stream.build import build_layer, meta_skeleton
from mtpquant.calib.stream.calibrate import break_module_cycles, calibrate_layer, merged_rows, pack_layer
from mtpquant.calib.stream.device import Spans, deterministic, move_to, placement
from mtpquant.calib.stream.inputs import EMBED_NAME, layer_inputs
from mtpquant.calib.stream.journal import (
    ENGINE_VERSION,
    Journal,
    entry_name,
    fingerprint,
    kill_point,
    open_journal,
    shard_name,
    work_dir_for,
)
from mtpquant.calib.stream.reader import READ_THREADS, ReadBuffers, ReadLog, layer_names, read_tensors
from mtpquant.calib.stream.save import final_config, restore_source_dtypes
from mtpquant.calib.stream.writer import StreamWriter, load_acts, save_acts, save_shard
from mtpquant.core.atomic import atomic_dir, atomic_write_json
from mtpquant.core.checkpoint import INDEX_NAME
from mtpquant.core.errors import MtpquantError
from mtpquant.core.measure import host_rss_gib, peak_memory
from mtpquant.model import recipes
from mtpquant.model.families.base import LAYERS


def quantize_stream(model_dir: Path, quant_ref: str, calib_ref: str, out_dir: Path,
                    restart: bool = False, split: str = "layers", read_threads: int | None = None) -> dict[str, Any]:
    import torch

    # MTPQUANT_STREAM_DETERMINISTIC=0: off on a GPU too (to measure what it costs or changes)
    on = torch.cuda.is_available() and os.environ.get("MTPQUANT_STREAM_DETERMINISTIC", "1") != "0"
    # the read thread outlives any error before the layers (the embedding is read from the start); the release
    # threads (the read buffers' unpinning, the old boundaries' unlinks: two, so neither waits for the other)
    # run beside the last layer and the final save: all are shut down here, whatever happened
    with deterministic(on) as settings, ThreadPoolExecutor(1, thread_name_prefix="stream-read") as reader, \
            ThreadPoolExecutor(2, thread_name_prefix="stream-release") as background:
        report = _quantize_stream(model_dir, quant_ref, calib_ref, out_dir, restart, split, reader, background,
                                  READ_THREADS if read_threads is None else read_threads)
    report["deterministic"] = settings
    return report


class _TimedExit:
    """`cm`, with the seconds its exit took into spans[name] (where the end of a run goes)."""

    def __init__(self, cm: Any, spans: dict[str, float], name: str):
        self.cm, self.spans, self.name = cm, spans, name

    def __enter__(self) -> Any:
        return self.cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        a = time.perf_counter()
        try:
            return self.cm.__exit__(*exc)
        finally:
            self.spans[self.name] = round(time.perf_counter() - a, 3)


def _timed(fn: Callable[[], Any], log: list[tuple[str, float]], name: str) -> Callable[[], None]:
    """fn, logging (name, its seconds): a release thread's step, for the report (list.append is atomic)."""
    def run() -> None:
        a = time.perf_counter()
        fn()
        log.append((name, time.perf_counter() - a))
    return run


@contextlib.contextmanager
def _released(buffers: ReadBuffers, background: ThreadPoolExecutor, out: list[Future],
              log: list[tuple[str, float]]) -> Iterator[None]:
    """The read buffers, released at the end if the last layer's build has not had them released: on an error
    at once, else on `background` (their future into `out`: unpinning GBs takes seconds)."""
    try:
        yield
    except BaseException:
        buffers.close()
        raise
    out.append(background.submit(_timed(buffers.close, log, "release_read_buffers")))


def _per_layer(journal: Journal, start: int) -> list[dict[str, Any]]:
    """Every layer's seconds and file hashes, by layer number, also those an earlier process finished
    (`resumed`: their timestamps count from that process's start)."""
    return [{"layer": e["layer"], "resumed": k < start, "shard_sha256": e["shard_sha256"],
             "activations_sha256": e["activations_sha256"], "host_rss_gib": e.get("host_rss_gib"), **e["seconds"]}
            for k, e in enumerate(journal.layers)]


def _quantize_stream(model_dir: Path, quant_ref: str, calib_ref: str, out_dir: Path,
                     restart: bool, split_by: str, reader: ThreadPoolExecutor,
                     background: ThreadPoolExecutor, read_threads: int) -> dict[str, Any]:
    import torch
    import transformers
    from compressed_tensors.offload.utils import as_single_threaded
    from llmcompressor.args import DatasetArguments
    from llmcompressor.datasets.utils import format_calibration_data
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file

    from mtpquant.calib import ranks
    from mtpquant.calib.calibration import build_dataset

    # Several processes (torchrun), two splits. Neither sums anything across ranks (a Hessian all-reduce sums in
    # another order, and GPTQ's rounding turns that into different packed weights and then different
    # activations for every later layer), so both give the one-process bits: a run can resume with another
    # number of ranks, and the tests compare hashes.
    # `--split layers` (default): decoder layer i belongs to rank i % world, which reads only its layers'
    # tensors, calibrates and solves them on every sample, writes their shards and hands its layer's output
    # activations to the next layer's rank (point to point). It parallelizes the read + pack + write (2.3x the
    # GPU work in the first H200 runs: benchmarks/STREAM_H200.md) and each rank's host memory is its own
    # layers' buffers; the GPU work stays serial, one layer after the other. Rank 0 writes the journal (only
    # once the owner has said a layer's files are durable), the index, config and the shard of everything
    # outside the layers.
    # `--split experts` divides the GPU work: every rank reads and runs every layer on every token (the attention,
    # router and routed forwards are repeated on each), forms the down_proj Hessians and solves only its share
    # of the experts, in whole solve batches of one process, and the owners broadcast the solved weights
    # (mtpquant.calib.expert_gptq). What it divides is the all-experts Hessian pass and the solves, the bulk of
    # a MoE layer's GPU work; rank 0 writes (`Split.writes`). `mtpquant plan` models both.
    split = ranks.init_stream(split_by)
    timed_share = _timed_share() if split.world == 1 else None
    solo = as_single_threaded if split.world > 1 else contextlib.nullcontext  # a rank's solve and packing are
    # its own: llm-compressor's GPTQ would all-reduce Hessians with ranks that are not calibrating this layer
    reads = ReadLog()
    t0 = time.perf_counter()
    load_phases: dict[str, float] = {}  # where the time before the first layer's compute goes
    load_span = Spans(load_phases)
    out_dir = Path(out_dir)
    source, config_dict, fam, qpath, cpath, recipe, calib, targets = checked_inputs(model_dir, quant_ref, calib_ref)
    load_span("inputs")
    if split.expert_share() is not None and recipe.fast_experts is None:
        raise MtpquantError(f"{qpath}: --split experts needs a fast_experts section (mtpquant.calib.expert_gptq "
                            "divides the experts; llm-compressor's GPTQModifier does not)")
    if recipe.pipeline != "sequential" or recipe.sequential_targets:
        raise MtpquantError(f"{qpath}: the stream engine runs whole decoder layers with the sequential pipeline "
                            "(pipeline: sequential, sequential_targets: null)")
    # the embedding (1.9 GB at GLM-5.2) is read while the tokenizer loads and the calibration data is tokenized
    embedding = reader.submit(read_tensors, source, [EMBED_NAME])

    tokenizer = transformers.AutoTokenizer.from_pretrained(source.root)
    load_span("tokenizer")
    dataset, data_summary = build_dataset(calib, tokenizer, str(cpath))
    with solo():  # every rank runs every sample (llm-compressor would partition them across ranks)
        loader = format_calibration_data(
            DatasetArguments(num_calibration_samples=len(dataset), max_seq_length=calib.max_seq_length,
                             shuffle_calibration_samples=False), dataset, tokenizer)
        batches = list(loader)
    load_span("calibration_data")
    # a layer's inputs and outputs are held at once
    place = placement(recipe, 2 * activation_bytes(config_dict, len(dataset), calib.max_seq_length))
    fp = fingerprint(source, qpath, cpath, data_summary["token_ids_sha256"])
    fp["deterministic_algorithms"] = str(torch.are_deterministic_algorithms_enabled())  # GPU outputs depend on it
    if timed_share is not None:
        fp["timed_share"] = str(timed_share)
    work = work_dir_for(out_dir)
    journal, start = open_journal(work, fp, restart, split)
    load_span("journal")

    config = transformers.AutoConfig.from_pretrained(source.root)
    cls = getattr(transformers, fam.architecture)
    skeleton = meta_skeleton(cls, config)
    n_layers = fam.num_layers(config_dict)
    n_shards = n_layers + 1
    expected = fam.routed_expert_linears(config_dict)

    buffers = ReadBuffers(source, pin=torch.cuda.is_available(), threads=read_threads)
    load_span("skeleton")

    def timed_read(i: int) -> tuple[dict[str, Any], float, float]:
        a = time.perf_counter()
        tensors = buffers.read(reads.record(layer_names(source, i)), functools.partial(kill_point, "read", i))
        return tensors, a - t0, time.perf_counter() - t0

    device = ranks.local_device() if split.world > 1 else _main_device()  # the GPU when there is one
    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]stream[/] {task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} layers"), TimeElapsedColumn(), console=console,
                        disable=split.rank != 0)
    task = progress.add_task(fam.architecture, total=n_layers, completed=start)
    per_layer_s: list[dict[str, float]] = []  # this process's layers (their timestamps share t0)
    solved = 0  # the Linears this process solved
    recorded: list[Future] = []  # the writer thread's entry + journal steps: their errors are raised below
    recorded_s: list[dict[str, float]] = []

    out_writer = StreamWriter(pin=torch.cuda.is_available())

    def timed_write(i: int, box: list[dict[str, Any]], hidden: list[Any], prev: list[Any]) -> dict[str, Any]:
        """Layer i's shard (streamed in safetensors' own layout: the bytes save_file writes) and, unless it is
        the last layer (nothing comes after it), the activations at its boundary. `box`: [the packed tensors],
        taken out so that they are freed once the shard is written (the executor keeps the arguments until the
        call returns)."""
        tensors = box.pop()
        a = time.perf_counter()
        name = shard_name(i + 1, n_shards)
        shard_sha = save_shard(work / name, tensors, out_writer, i)
        b = time.perf_counter()
        shard_bytes = (work / name).stat().st_size
        del tensors
        acts_name = acts_sha = None
        acts_bytes = 0
        if i + 1 < n_layers:
            acts_name = f"activations-after-{i:05d}.safetensors"
            acts_sha = save_acts(work / acts_name, hidden, prev, out_writer)
            acts_bytes = (work / acts_name).stat().st_size
        c = time.perf_counter()
        return {"shard": name, "shard_sha256": shard_sha, "activations": acts_name, "activations_sha256": acts_sha,
                "write_start": a - t0, "write_end": c - t0, "write_shard": round(b - a, 3),
                "write_activations": round(c - b, 3), "shard_bytes": shard_bytes, "activations_bytes": acts_bytes}

    def journal_progress() -> None:
        """Rank 0: journal every layer whose files its owner has reported durable."""
        if journal is not None and journal.absorb():
            progress.update(task, completed=len(journal.layers))

    def record(entry: dict[str, Any], files: dict[str, Any]) -> None:
        """The writer thread, after the layer's files: its entry file, then (rank 0) the journal, which also has
        the boundary before deleted (only the newest is needed to resume). Not on the thread that drives the GPU,
        and the ~6 GB unlink on a thread of its own: on the H200 this took 1.7-1.8 s per layer, delaying the
        next write. The entry file is not fsynced: the journal is the durable record (fsynced), and an entry
        lost in a power cut only means that layer runs again."""
        a = time.perf_counter()
        atomic_write_json(work / entry_name(entry["layer"]),
                          {"layer": entry["layer"], **files, **{k: v for k, v in entry.items() if k != "layer"}},
                          fsync=False)
        b = time.perf_counter()
        journal_progress()
        recorded_s.append({"layer": entry["layer"], "entry": round(b - a, 3),
                           "journal": round(time.perf_counter() - b, 3)})

    def finish(pending: tuple[Future, dict[str, Any]]) -> None:
        """Waits for a layer's shard and activations to be durable, then (only then) has its entry file written,
        which rank 0 journals."""
        fut, entry = pending
        w0 = time.perf_counter()
        files = fut.result()
        waited = time.perf_counter() - w0
        t = entry["seconds"]
        t.update(write=round(files.pop("write_end") - files["write_start"], 3), waited_for_write=round(waited, 3),
                 write_start=round(files.pop("write_start"), 3),
                 **{k: files.pop(k) for k in ("write_shard", "write_activations", "shard_bytes", "activations_bytes")})
        recorded.append(writer.submit(record, entry, files))
        per_layer_s.append(t)

    # I/O overlaps compute: one thread reads this rank's next layer while its current one calibrates (at most one
    # layer ahead), one writes its layer's shard while its next layer computes (at most one write in flight;
    # with several ranks also while the other ranks compute theirs); a layer is journaled only once its files
    # are durable, so resume is as before
    # (exits in reverse: the writer, which submits the unlinks to `background`, is shut down first)
    tail: dict[str, float] = {}  # the seconds after the last layer's compute, by step
    released: list[Future] = []
    release_log: list[tuple[str, float]] = []  # the release threads' steps
    with progress, _released(buffers, background, released, release_log), \
            _TimedExit(contextlib.closing(out_writer), tail, "close_writer"), \
            reader, \
            _TimedExit(ThreadPoolExecutor(1, thread_name_prefix="stream-write"), tail, "writer_thread") as writer:
        # this rank's first layer is read while the calibration batches are embedded (0.65 s exposed on the H200)
        mine = split.mine(start, n_layers)
        ahead = reader.submit(timed_read, mine[0]) if mine else None

        # every rank needs the other arguments of a decoder layer (masks, rotary tables); only the first
        # layer's rank uses the hidden states, and each batch goes where activations wait as soon as it is
        # embedded: all of them on the host at once (4.8 GB at GLM-5.2's 393K tokens) set the host's peak on the
        # H200 (glibc keeps the freed heap). Inside the with-block: an error here shuts the early read down.
        keep = start == 0 and split.owns(0)
        load_span("start_threads")
        hidden, kwargs = layer_inputs(skeleton, config, source, batches, place.put if keep else lambda t: None,
                                      load_phases, embedding, device)
        load_span.t = time.perf_counter()
        reads.record([EMBED_NAME])
        prev: list[Any] | None = [None] * len(hidden)
        if 0 < start < n_layers and split.owns(start):  # resume: the activations after the last finished layer
            hidden, prev = place.put(load_acts(work / f"activations-after-{start - 1:05d}.safetensors"))
        if not split.owns(start):
            hidden = prev = None
        kwargs = move_to(kwargs, place.device)  # masks and rotary tables wait with the activations (moved once)
        load_span("inputs_in_place")  # resumed activations, masks and rotary tables moved to the GPU
        t_load = time.perf_counter()
        if journal is not None:
            # the old boundary's unlink (~6 GB) off the writer's path; the last one (1.2-1.6 s on the H200, the
            # run's last step when it ran before the final save) beside the final save, like the read buffers
            journal.discard = lambda p: released.append(background.submit(
                _timed(functools.partial(p.unlink, missing_ok=True), release_log, "unlink_boundaries")))
        pending: tuple[Future, dict[str, Any]] | None = None
        for i in range(start, n_layers):
            nxt = i + 1 if i + 1 < n_layers else None
            if not split.owns(i):
                if nxt is not None and split.owns(nxt):  # the next layer is mine: its inputs come from layer i's
                    hidden, prev = place.put(ranks.recv_tensors(split.owner(i)))
                writer.submit(journal_progress)  # the journal is the writer thread's while the layers run
                continue
            w0 = time.perf_counter()
            tensors, r_start, r_end = ahead.result()
            waited_read = time.perf_counter() - w0
            later = [k for k in mine if k > i]
            ahead = reader.submit(timed_read, later[0]) if later else None
            tb = time.perf_counter()
            meta_layer = skeleton.model.layers[i]
            phases: dict[str, float] = {}
            gpu_gib: dict[str, float] = {}
            span = Spans(phases, device, gpu_gib)
            with solo():  # linearizing offloads through compressed-tensors' caches: per rank too
                layer = build_layer(skeleton, i, source, device, tensors)
                del tensors
                span("build")  # the GPU synchronized: the layer's copies out of the read buffer are done
                if ahead is None:  # this rank's last layer: the read buffers are unpinned beside its compute
                    # (at the end, 2.7 s of the H200's tail, after the last boundary's unlink on one thread)
                    released.append(background.submit(_timed(buffers.close, release_log, "release_read_buffers")))
                hidden, prev, rows, counts, mod_state = calibrate_layer(
                    skeleton, i, layer, recipe, targets, hidden, prev, kwargs, fam, config_dict, device, place,
                    share=split.expert_share() or timed_share, spans=phases, gpu=gpu_gib)
                span.t = time.perf_counter()
                packed = pack_layer(skeleton, layer, i) if split.writes(i) else None
                span("pack")
            solved += len(rows)
            if split.expert_share() is not None:  # each rank logged the Linears it solved
                rows = merged_rows(ranks.gather(rows, ranks.control()))
                span("gather")
            skeleton.model.layers[i] = meta_layer  # the real layer is dropped: its weights are freed
            break_module_cycles(layer)
            del layer
            if packed is None:  # the expert split: rank 0 writes
                writer.submit(journal_progress)
                continue
            restored = restore_source_dtypes(packed, source)
            reads.record(restored)
            tc = time.perf_counter()
            if pending is not None:
                finish(pending)
            entry = {"layer": i, "tensors": sorted(packed), "per_linear": rows,
                     "routing_counts": counts.tolist() if counts is not None else None,
                     "dtype_restored": restored, "modifier": mod_state, "host_rss_gib": host_rss_gib(),
                     "seconds": {"read": round(r_end - r_start, 3), "waited_for_read": round(waited_read, 3),
                                 "compute": round(tc - tb, 3), "read_start": round(r_start, 3),
                                 **{f"compute_{k}": v for k, v in phases.items()},
                                 **{f"gpu_peak_gib_after_{k}": v for k, v in gpu_gib.items()},
                                 "compute_start": round(tb - t0, 3), "compute_end": round(tc - t0, 3)}}
            if nxt is not None and not split.owns(nxt):
                ranks.send_tensors((hidden, prev), split.owner(nxt))
            # the writer's own lists: the next layer's propagation pass empties these as it goes
            pending = (writer.submit(timed_write, i, [packed], list(hidden), list(prev)), entry)
            del packed
            if not split.owns(nxt if nxt is not None else i):  # the next layer's inputs come from another rank
                hidden = prev = None
        if pending is not None:
            finish(pending)
    a = time.perf_counter()
    for f in recorded:
        f.result()
    tail["entries"] = round(time.perf_counter() - a, 3)
    if journal is not None:
        journal.discard = Journal.unlink
    # every rank's layers are durable once all have come here (the gather is the barrier)
    per_rank = ranks.gather({"rank": split.rank, "reads": reads.summary(source), "io": _io(per_layer_s),
                             "solved_linears": solved, "host_rss_gib": host_rss_gib(), "memory": peak_memory()},
                            ranks.control())
    if split.rank != 0:
        return {"stage": "quantize", "engine": "stream", "rank": split.rank, "ranks": split.world,
                "reads": per_rank[split.rank]["reads"]}
    journal_progress()
    if len(journal.layers) != n_layers:
        missing = [i for i in range(len(journal.layers), n_layers) if not (work / entry_name(i)).is_file()]
        raise MtpquantError(f"quantize --engine stream: layers {missing[:5]} have no durable files in {work}")
    t_calib = time.perf_counter()

    # the rest: every tensor outside the decoder layers (MTP layers are dropped, as the memory engine does)
    in_model = set(skeleton.state_dict())
    rest_names = reads.record([n for n in source.weight_map if not n.startswith(LAYERS) and n in in_model])
    rest = read_tensors(source, rest_names)
    per_rank[0]["reads"] = reads.summary(source)
    modifier = modifier_for(recipe, targets)
    for e in journal.layers:  # fields the solve resolved (e.g. batched_quantization "auto"), as recipe.yaml
        for k, v in e["modifier"].items():  # of the memory engine records them
            setattr(modifier, k, v)
    with atomic_dir(out_dir) as tmp, solo():
        weight_map: dict[str, str] = {}
        total = 0
        for entry in journal.layers:
            os.link(work / entry["shard"], tmp / entry["shard"])
            weight_map.update(dict.fromkeys(entry["tensors"], entry["shard"]))
        last = shard_name(n_shards, n_shards)
        save_file(rest, str(tmp / last), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(rest, last))
        for f in set(weight_map.values()):
            total += (tmp / f).stat().st_size
        atomic_write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))})
        final_config(cls, config, modifier, tmp, source.root)
        tokenizer.save_pretrained(tmp)
    a = time.perf_counter()
    for f in released:  # the old boundaries unlinked and the read buffers released while the rest was saved
        f.result()
    tail["waited_for_release"] = round(time.perf_counter() - a, 3)
    shutil.rmtree(work, ignore_errors=True)
    t_save = time.perf_counter()

    rows = [r for e in journal.layers for r in e["per_linear"]]
    counts = {e["layer"]: torch.tensor(e["routing_counts"]) for e in journal.layers if e["routing_counts"]}
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    report = {
        "stage": "quantize", "engine": "stream", "engine_version": ENGINE_VERSION,
        "model": str(source.root), "family": fam.model_type, "output": str(out_dir),
        "recipe": {"path": str(qpath), "sha256": recipes.recipe_sha256("quant", qpath), "targets": targets},
        "calibration": {"path": str(cpath), "sha256": recipes.recipe_sha256("calibration", cpath), **data_summary},
        "activations_on": place.device, "activations_pinned": place.pin, "resumed_after_layers": start,
        "read_buffers": {"bytes": buffers.peak_bytes, "pinned": buffers.was_pinned,
                         "bytes_read": buffers.bytes_read, "threads": buffers.threads},
        "quantized_linears": len(rows), "expected_linears": len(expected), "ranks": split.world,
        "split": split.by, "timed_share": timed_share,
        "per_rank": per_rank,
        "gptq_loss_median": statistics.median(losses) if losses else None,
        "gptq_loss_max": max(losses) if losses else None,
        "few_token_experts": few_token_experts(counts, fam.experts_per_token(config_dict, default=1)),
        "routing_counts": {str(k): v.tolist() for k, v in counts.items()},
        "dtype_restored": sorted(n for e in journal.layers for n in e["dtype_restored"]),
        "seconds": {"load": round(t_load - t0, 2), "load_phases": load_phases, "tail_phases": tail,
                    "release_phases": {k: round(sum(t for n, t in release_log if n == k), 3)
                                       for k in sorted({n for n, _ in release_log})},
                    "calibrate_and_solve": round(t_calib - t_load, 2),
                    "save": round(t_save - t_calib, 2), "total": round(t_save - t0, 2),
                    "per_layer": _per_layer(journal, start), "record": recorded_s,
                    "io": round(sum(r["io"]["io"] for r in per_rank), 3),
                    "io_hidden": round(sum(r["io"]["io_hidden"] for r in per_rank), 3)},
        "memory": peak_memory(),
        "per_linear": rows,
        "rank": 0,
    }
    if len(rows) != len(expected) and timed_share is None:
        raise MtpquantError(f"GPTQ compressed {len(rows)} Linears, expected {len(expected)}")
    return report


def _io(per_layer_s: list[dict[str, float]]) -> dict[str, float]:
    """This process's read + write seconds, and how much of it ran while it (or another rank) computed."""
    return {"io": round(sum(t["read"] + t["write"] for t in per_layer_s), 3),
            "io_hidden": round(sum(max(0.0, t["read"] - t["waited_for_read"]) +
                                   max(0.0, t["write"] - t["waited_for_write"]) for t in per_layer_s), 3)}


def _timed_share() -> tuple[int, int] | None:
    """Benchmarks only: MTPQUANT_STREAM_TIMED_SHARE=R/W makes one process do rank R's GPU work of the expert split
    over W ranks (its Hessians and solves; nothing is broadcast, so the other experts stay unsolved and the
    artifact is not a valid one), to time a rank's layer on one GPU when several are not at hand."""
    text = os.environ.get("MTPQUANT_STREAM_TIMED_SHARE")
    if not text:
        return None
    try:
        rank, world = (int(x) for x in text.split("/"))
    except ValueError:
        raise MtpquantError(f"MTPQUANT_STREAM_TIMED_SHARE: expected RANK/WORLD, got {text!r}") from None
    if not 0 <= rank < world:
        raise MtpquantError(f"MTPQUANT_STREAM_TIMED_SHARE: rank {rank} is not in 0..{world - 1}")
    return rank, world


def _main_device() -> Any:
    from llmcompressor.utils.dev import get_main_device

    return get_main_device()
