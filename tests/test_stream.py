"""`quantize --engine stream` against the memory engine (the reference), on both tiny families.

The two engines run the same llm-compressor pieces on the same batches in the same order (the stream engine
drives the modifier's lifecycle one decoder layer at a time, as the sequential pipeline does per subgraph),
on CPU, so bit-equality is expected and asserted: every tensor, config.json, recipe.yaml, every GPTQ loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtpquant.calib.stream.device import Placement, deterministic, placement
from mtpquant.calib.stream.engine import quantize_stream
from mtpquant.calib.stream.journal import JOURNAL, Journal, work_dir_for
from mtpquant.chain.inject_mtp import inject_mtp
from mtpquant.chain.verify import verify
from mtpquant.cli import main
from mtpquant.core.checkpoint import Checkpoint
from mtpquant.core.errors import MtpquantError
from mtpquant.model.recipes import RECIPES_DIR
from mtpquant.model.recipes import load as load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def streamed(built) -> dict[str, dict[str, Path]]:
    out = {}
    for fam, paths in built.items():
        root = paths["root"]
        report = quantize_stream(paths["base"], "w4a16-asym-g128", "tiny-local", root / "streamed")
        out[fam] = {"quantized": root / "streamed", "report": report}
    return out


def all_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(set(Checkpoint(ckpt).weight_map.values())):
        out.update(load_file(str(ckpt / shard)))
    return out


def file_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_stream_equals_memory(built, streamed, family):
    mem, st = built[family]["quantized"], streamed[family]["quantized"]
    a, b = all_tensors(mem), all_tensors(st)
    assert sorted(a) == sorted(b)
    differ = [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or not torch.equal(a[n], b[n])]
    assert differ == []
    assert json.loads((mem / "config.json").read_text()) == json.loads((st / "config.json").read_text())
    for f in ("recipe.yaml", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (mem / f).read_bytes() == (st / f).read_bytes(), f
    ra = json.loads(built[family]["quantize_report"].read_text())
    rb = streamed[family]["report"]
    assert {r["module"]: r["loss"] for r in ra["per_linear"]} == {r["module"]: r["loss"] for r in rb["per_linear"]}
    assert ra["routing_counts"] == rb["routing_counts"]
    assert rb["quantized_linears"] == rb["expected_linears"] == 48 and rb["engine"] == "stream"
    assert not work_dir_for(st).exists(), "the work dir is removed once the artifact is complete"
    # one shard per decoder layer plus one for the rest, and an index
    assert len(set(Checkpoint(st).weight_map.values())) == Checkpoint(st).config["num_hidden_layers"] + 1


def test_io_overlaps_compute(streamed, family):
    per_layer = streamed[family]["report"]["seconds"]["per_layer"]
    assert len(per_layer) >= 2
    for cur, nxt in zip(per_layer, per_layer[1:], strict=False):
        # layer i+1 was being read before layer i's compute ended, and layer i's shard was written while
        # layer i+1 computed (its write began before layer i+1's compute ended)
        assert nxt["read_start"] < cur["compute_end"]
        assert cur["write_start"] >= cur["compute_end"] and cur["write_start"] < nxt["compute_end"]
    sec = streamed[family]["report"]["seconds"]
    assert 0 < sec["io_hidden"] <= sec["io"] + 1e-3


def test_stream_artifact_passes_verify_after_inject(built, streamed, family, tmp_path):
    inject_mtp(built[family]["base"], streamed[family]["quantized"], tmp_path / "artifact")
    checks = verify(tmp_path / "artifact", built[family]["base"])
    assert all(c.ok for c in checks), [c.failures for c in checks if c.failures]


def _cli(run: Path, base: Path, out: Path, *extra: str, env: dict[str, str] | None = None):
    e = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mtpquant", "quantize", "--run", str(run), "--model", str(base),
                           "--out", str(out), "--engine", "stream", *extra], capture_output=True, text=True, env=e,
                          cwd=REPO)


def test_sigkill_then_resume_gives_the_same_files(built, streamed, tmp_path):
    base = built["glm4_moe"]["base"]
    out, run = tmp_path / "out", tmp_path / "run"
    work = work_dir_for(out)
    layers = lambda: [e["layer"] for e in json.loads((work / JOURNAL).read_text())["layers"]]  # noqa: E731
    # killed while layer 1's shard was being written: the temp file is left, layer 1 is not finished
    proc = _cli(run, base, out, env={"MTPQUANT_STREAM_KILL": "write:1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    # the temp name carries its owner (mtpquant.core.atomic): the resume removes what the dead process left
    assert layers() == [0] and any(p.name.startswith(".model-00002-of-") and ".safetensors.tmp-" in p.name
                                   for p in work.iterdir())
    # resumed, then killed right after layer 1's journal entry
    proc = _cli(run, base, out, env={"MTPQUANT_STREAM_KILL": "after:1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert layers() == [0, 1]
    assert not any(".tmp-" in p.name for p in work.iterdir()), "the dead process's temp file was removed"
    assert not out.exists()

    # a changed recipe refuses to resume, in one line naming what changed (exit 2)
    changed = tmp_path / "changed.yaml"
    changed.write_text((RECIPES_DIR / "quant" / "w4a16-asym-g128.yaml").read_text()
                       .replace("dampening_frac: 0.01", "dampening_frac: 0.02"))
    with pytest.raises(MtpquantError) as exc:
        quantize_stream(base, changed, "tiny-local", out)
    msg = str(exc.value)
    assert "\n" not in msg and "recipe changed" in msg and "--restart" in msg
    # the embedding's read, started before the journal was opened, is not left running
    assert [t.name for t in threading.enumerate() if t.name.startswith("stream-")] == []
    assert main(["quantize", "--run", str(run), "--model", str(base), "--out", str(out), "--engine", "stream",
                 "--recipe", str(changed)]) == 2

    proc = _cli(run, base, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads((run / "quantize.json").read_text())
    assert rep["resumed_after_layers"] == 2 and rep["quantized_linears"] == 48
    per_layer = rep["seconds"]["per_layer"]  # every layer by number, also those finished before the resume
    n = Checkpoint(base).config["num_hidden_layers"]
    assert [e["layer"] for e in per_layer] == list(range(n))
    assert [e["resumed"] for e in per_layer] == [True, True] + [False] * (n - 2)
    assert all({"read", "compute", "write", "shard_sha256", "activations_sha256"} <= set(e) for e in per_layer)
    assert rep["activations_on"] == "cpu" and rep["activations_pinned"] is False
    assert rep["deterministic"] == {"enabled": False}  # CPU: nothing changed
    # the reused read buffers, as they were while the layers were read (the report is written after they close)
    from mtpquant.model.families.base import layer_prefix

    rb, tensors = rep["read_buffers"], Checkpoint(base).tensors
    layer_bytes = [sum(t.nbytes + 64 for name, t in tensors.items() if name.startswith(layer_prefix(i)))
                   for i in range(n)]  # + each tensor's alignment in the buffer
    assert rb["pinned"] is False and 0 < rb["bytes"] <= 2 * max(layer_bytes), (rb, layer_bytes)
    assert file_hashes(out) == file_hashes(streamed["glm4_moe"]["quantized"])


@pytest.mark.parametrize(("phase", "fam"), [("read", "glm_moe_dsa"), ("calibrate", "glm4_moe"),
                                          ("write", "glm_moe_dsa")])
def test_sigkill_in_each_phase_of_a_drawn_layer_then_resume_gives_the_same_files(built, streamed, tmp_path,
                                                                                   phase, fam):
    """A real SIGKILL in the middle of a phase (half of the layer's bytes read; half of the calibration batches
    through it with the Hessian hooks on; its shard written to a temp file) of a layer drawn with the phase's
    name as the seed (the draws are fixed, so CI is deterministic: read 0, during the embedding; calibrate 2,
    the last MoE layer; write 0), then the same command: the uninterrupted run's files, byte for byte."""
    import random

    base = built[fam]["base"]
    n = Checkpoint(base).config["num_hidden_layers"]
    layer = random.Random(phase).randrange(n)
    out, run = tmp_path / "out", tmp_path / "run"
    proc = _cli(run, base, out, env={"MTPQUANT_STREAM_KILL": f"{phase}:{layer}"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    finished = [e["layer"] for e in json.loads((work_dir_for(out) / JOURNAL).read_text())["layers"]]
    assert finished == list(range(len(finished))) and len(finished) <= layer, (phase, layer, finished)
    assert not out.exists()
    proc = _cli(run, base, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "quantize.json").read_text())["resumed_after_layers"] == len(finished)
    assert file_hashes(out) == file_hashes(streamed[fam]["quantized"])


def _fake_layer(work: Path, i: int) -> dict:
    (work / f"s{i}").write_bytes(b"shard %d" % i)
    (work / f"a{i}").write_bytes(b"acts %d" % i)
    h = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    return {"layer": i, "shard": f"s{i}", "shard_sha256": h(work / f"s{i}"), "activations": f"a{i}",
            "activations_sha256": h(work / f"a{i}")}


def test_journal_keeps_only_intact_layers_and_restart_starts_over(tmp_path):
    work = tmp_path / "out.work"
    fp = {"recipe": "r1", "token_ids": "t1", "engine": "e"}
    j = Journal(work, fp, restart=False)
    for i in range(3):
        j.layers.append(_fake_layer(work, i))
    j._write()
    assert len(Journal(work, fp, restart=False).layers) == 3
    (work / "s2").write_bytes(b"torn")  # layer 2's shard differs from its journal entry: not finished
    assert [e["layer"] for e in Journal(work, fp, restart=False).layers] == [0, 1]
    (work / "a1").unlink()  # no activations after layer 1: back off to layer 0's boundary
    assert [e["layer"] for e in Journal(work, fp, restart=False).layers] == [0]
    with pytest.raises(MtpquantError, match=r"token_ids changed since it started; re-run with --restart"):
        Journal(work, {**fp, "token_ids": "t2"}, restart=False)
    j = Journal(work, {**fp, "token_ids": "t2"}, restart=True)
    assert j.layers == [] and not (work / "s0").exists()


def test_two_mtp_layers_are_left_to_inject_mtp(tmp_path, family):
    """Both layouts with 2 MTP layers: the stream engine reads only decoder layers 0..n-1 (the MTP layers, like
    from_pretrained's, are skipped), its tensors are the memory engine's bit for bit, and inject-mtp + verify
    accept the result."""
    from mtpquant.calib.quantize import quantize
    from mtpquant.model.recipes import FixtureSpec
    from mtpquant.tiny.fixture import write_fixture

    base = write_fixture(family, FixtureSpec(num_nextn_predict_layers=2), tmp_path / "base")
    quantize_stream(base, "w4a16-asym-g128", "tiny-local", tmp_path / "q")
    quantize(base, "w4a16-asym-g128", "tiny-local", tmp_path / "mem")
    n = Checkpoint(base).config["num_hidden_layers"]
    names = Checkpoint(tmp_path / "q").weight_map
    assert not any(k.startswith((f"model.layers.{n}.", f"model.layers.{n + 1}.")) for k in names)
    a, b = all_tensors(tmp_path / "mem"), all_tensors(tmp_path / "q")
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    inject_mtp(base, tmp_path / "q", tmp_path / "artifact")
    checks = verify(tmp_path / "artifact", base)
    assert all(c.ok for c in checks), [c.failures for c in checks if c.failures]


def test_activations_follow_the_recipe(monkeypatch):
    """The memory engine's rule (quantize.activation_device) for `fast_experts.activations: auto`: the GPU when
    the cache takes at most 15% of it, else host memory, pinned only when CUDA is there."""
    recipe = load_recipe("quant", RECIPES_DIR / "quant" / "w4a16-asym-g128.yaml")
    assert recipe.fast_experts.activations == "auto"
    gib = 1 << 30
    assert placement(recipe, 10 * gib, gpu=("cuda:0", 141 * gib), cuda=True) == Placement("cuda:0", False)
    assert placement(recipe, 30 * gib, gpu=("cuda:0", 141 * gib), cuda=True) == Placement("cpu", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement(recipe, 1) == Placement("cpu", False)  # no CUDA: plain host memory, as before
    x = {"h": [torch.ones(2)], "t": (None, torch.zeros(1))}
    assert Placement().put(x)["h"][0] is x["h"][0]  # on the CPU a no-op


def test_deterministic_sets_then_restores(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic(True) as settings:
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert settings["allow_tf32"] is False and settings["float32_matmul_precision"] == "highest"
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert torch.utils.deterministic.fill_uninitialized_memory is True
    assert torch.are_deterministic_algorithms_enabled() == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic(False) as settings:
        assert settings == {"enabled": False} and torch.are_deterministic_algorithms_enabled() == before


def test_write_path_stream_writer_is_safetensors_bytes(tmp_path):
    """StreamWriter (the activations' writer) lays a file out exactly as safetensors' own serializer does for
    the same order, and the sha256 it computes while writing is the file's."""
    from safetensors.torch import save

    from mtpquant.calib.stream.writer import StreamWriter, _acts_entries, load_acts, save_acts

    g = torch.Generator().manual_seed(0)
    ts = {"b": torch.randn(3, 5, generator=g).to(torch.bfloat16), "a": torch.arange(7), "c": torch.randn(2, 2)}
    ref = save(ts, metadata={"format": "pt"})
    hlen = int.from_bytes(ref[:8], "little")
    order = [k for k in json.loads(ref[8:8 + hlen]) if k != "__metadata__"]  # safetensors' order
    sha = StreamWriter(chunk=8).write(tmp_path / "x", [(k, ts[k]) for k in order], {"format": "pt"})
    assert (tmp_path / "x").read_bytes() == ref and sha == hashlib.sha256(ref).hexdigest()
    hidden = [torch.randn(1, 4, 6, generator=g).to(torch.bfloat16) for _ in range(3)]
    for tops in ([None] * 3, [torch.randint(0, 4, (1, 4, 2), generator=g) for _ in range(3)]):
        sha = save_acts(tmp_path / "acts", hidden, tops, StreamWriter(chunk=16))
        assert sha == hashlib.sha256((tmp_path / "acts").read_bytes()).hexdigest()
        h, t = load_acts(tmp_path / "acts")
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(h, hidden, strict=True))
        assert [x is None for x in t] == [x is None for x in tops]
        assert all(a is None or torch.equal(a, b) for a, b in zip(t, tops, strict=True))
        assert len(_acts_entries(hidden, tops)) == 3 + sum(x is not None for x in tops)


def test_stream_writer_flushing_as_it_writes_keeps_the_bytes(tmp_path, monkeypatch):
    """StreamWriter starts writeback every FLUSH_BYTES on its flush thread (fdatasync while it hashes and
    writes on); here every 64 bytes: the file and its sha256 are still safetensors' own, and it did flush."""
    from safetensors.torch import save

    from mtpquant.calib.stream import writer as stream

    calls = []
    real = os.fdatasync
    monkeypatch.setattr(stream, "FLUSH_BYTES", 64)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    g = torch.Generator().manual_seed(2)
    ts = {f"t{k}": torch.randn(40 + k, generator=g) for k in range(12)}
    ref = save(ts, metadata={"format": "pt"})
    writer = stream.StreamWriter(chunk=96)
    sha = stream.save_shard(tmp_path / "s.safetensors", ts, writer)
    writer.close()
    assert (tmp_path / "s.safetensors").read_bytes() == ref and sha == hashlib.sha256(ref).hexdigest()
    assert calls


def test_streamed_shard_is_save_files_bytes(tmp_path):
    """save_shard (the layer shards' writer: safetensors' order asked of safetensors, streamed, hashed while
    written) gives byte for byte the file `save_file` writes for the same packed-layer tensors, whatever the
    chunk size (chunks smaller than, equal to and larger than a tensor)."""
    from safetensors.torch import save_file

    from mtpquant.calib.stream.writer import StreamWriter, safetensors_order, save_shard

    g = torch.Generator().manual_seed(1)
    p = "model.layers.3.mlp.experts"
    ts = {}
    for e in (0, 1, 10, 2):  # names that sort differently as text and as numbers
        for proj in ("gate_proj", "up_proj", "down_proj"):
            ts[f"{p}.{e}.{proj}.weight_packed"] = torch.randint(-2**31, 2**31 - 1, (6, 4), dtype=torch.int32,
                                                                generator=g)
            ts[f"{p}.{e}.{proj}.weight_scale"] = torch.randn(6, 1, generator=g).to(torch.bfloat16)
            ts[f"{p}.{e}.{proj}.weight_zero_point"] = torch.randint(0, 15, (1, 1), dtype=torch.int32, generator=g)
            ts[f"{p}.{e}.{proj}.weight_shape"] = torch.tensor([6, 32], dtype=torch.int64)
    ts["model.layers.3.mlp.gate.e_score_correction_bias"] = torch.randn(4, generator=g)
    ts["model.layers.3.input_layernorm.weight"] = torch.randn(32, generator=g).to(torch.bfloat16)
    ts["model.layers.3.flag"] = torch.tensor([True, False])
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert len(set(t.dtype for t in ts.values())) == 5 and safetensors_order(ts) != sorted(ts)
    for chunk in (8, 24, 96, 1 << 20):
        writer = StreamWriter(chunk=chunk)
        sha = save_shard(tmp_path / "s.safetensors", ts, writer)
        writer.close()
        assert (tmp_path / "s.safetensors").read_bytes() == ref, chunk
        assert sha == hashlib.sha256(ref).hexdigest()


def test_read_buffers_and_layer_state_equal_the_old_read(built, family):
    """ReadBuffers (reused buffers, offsets from the checked headers) gives read_tensors' values; layer_state
    gives fuse_experts + .to(dtype)'s; a buffer is reused every second read."""
    from mtpquant.calib.stream.build import fuse_experts, layer_state
    from mtpquant.calib.stream.reader import ReadBuffers, layer_names, read_tensors
    from mtpquant.model.families.base import layer_prefix

    src = Checkpoint(built[family]["base"])
    n = src.config["num_hidden_layers"]
    buffers = ReadBuffers(src)
    for i in list(range(n)) + [0]:
        names = layer_names(src, i)
        old, new = read_tensors(src, names), buffers.read(names)
        assert list(new) == names
        assert all(old[k].dtype == new[k].dtype and torch.equal(old[k], new[k]) for k in names)
        ref = {k: v.to(torch.bfloat16) for k, v in fuse_experts(old, layer_prefix(i)).items()}
        state = layer_state(new, layer_prefix(i), "cpu", {k: torch.bfloat16 for k in ref})
        assert sorted(state) == sorted(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
        assert all(v.untyped_storage().data_ptr() not in {b.data_ptr() for b in buffers.bufs if b is not None}
                   for v in state.values())  # nothing of the state points into a read buffer
    assert buffers.reads == n + 1 and buffers.pinned is False
    buffers.close()


def test_read_threads_split_a_layer_and_give_the_same_bytes(built, monkeypatch, tmp_path):
    """ReadBuffers with several threads: each reads a contiguous run of the layer's bytes (cut inside tensors
    here: 4 KiB pieces), the values are one thread's; `midway` fires once; a shard cut short is a one-line error
    naming the tensor."""
    import shutil

    from mtpquant.calib.stream import reader
    from mtpquant.calib.stream.reader import ReadBuffers, _contiguous_parts, layer_names

    monkeypatch.setattr(reader, "CHUNK", 4096)
    src = Checkpoint(built["glm_moe_dsa"]["base"])
    names = layer_names(src, 1)
    one, three = ReadBuffers(src, threads=1), ReadBuffers(src, threads=3)
    fired: list[int] = []
    a, b = one.read(names), three.read(names, midway=lambda: fired.append(1))
    assert fired == [1] and list(a) == list(b) == names
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in names)
    one.close()
    three.close()
    pieces = [(None, 0, 0, n) for n in (5, 1, 1, 1, 7, 2)]
    parts = _contiguous_parts(pieces, 3)
    assert [p for part in parts for p in part] == pieces and len(parts) == 3
    assert _contiguous_parts(pieces, 1) == [pieces] and _contiguous_parts([], 4) == []

    shutil.copytree(src.root, tmp_path / "cut")
    cut = Checkpoint(tmp_path / "cut")  # headers checked here; the shard is cut after
    last = cut.tensors[names[-1]]
    with open(last.shard, "r+b") as fh:
        fh.truncate(last.start + last.nbytes - 1)
    with pytest.raises(MtpquantError) as exc:
        ReadBuffers(cut, threads=2).read(names)
    assert "\n" not in str(exc.value) and "truncated at byte" in str(exc.value) and str(last.shard) in str(exc.value)


def test_kill_after_the_last_layer_then_resume(built, streamed, tmp_path):
    """The last layer writes no activations (nothing comes after it): killed right after its journal entry,
    the run resumes with every layer finished and assembles the same files."""
    base = built["glm4_moe"]["base"]
    out, run = tmp_path / "out", tmp_path / "run"
    n = Checkpoint(base).config["num_hidden_layers"]
    proc = _cli(run, base, out, env={"MTPQUANT_STREAM_KILL": f"after:{n - 1}"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    journal = json.loads((work_dir_for(out) / JOURNAL).read_text())["layers"]
    assert [e["layer"] for e in journal] == list(range(n)) and journal[-1]["activations"] is None
    # the newest boundary's activations are kept: the one before the last layer (an older one may be left
    # when the kill came before its unlink on the release thread: resume deletes it)
    left = sorted(p.name for p in work_dir_for(out).glob("activations-*"))
    assert left[-1] == f"activations-after-{n - 2:05d}.safetensors" and len(left) <= 2, left
    proc = _cli(run, base, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads((run / "quantize.json").read_text())
    assert rep["resumed_after_layers"] == n
    assert file_hashes(out) == file_hashes(streamed["glm4_moe"]["quantized"])
    shards = {e["shard"]: e["shard_sha256"] for e in journal}  # the recorded sha256 are the files'
    assert all(file_hashes(out)[s] == h for s, h in shards.items())


def test_layer_inputs_frees_what_it_caught_without_the_cyclic_gc(built, family):
    """Layer 0's inputs die with the caller's last reference, with the cyclic GC off: a catcher class that
    closed over its list kept them (and, on the GPU, one extra set of hidden states at the peak) until a
    collection happened to run."""
    import gc
    import weakref

    import transformers

    from mtpquant.calib.stream.build import meta_skeleton
    from mtpquant.calib.stream.inputs import layer_inputs

    src = Checkpoint(built[family]["base"])
    config = transformers.AutoConfig.from_pretrained(src.root)
    skeleton = meta_skeleton(getattr(transformers, config.architectures[0]), config)
    ids = torch.randint(0, src.config["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}] * 2
    gc.collect()
    gc.disable()
    try:
        hidden, kwargs = layer_inputs(skeleton, config, src, batches, put=lambda t: t.clone())
        assert len(hidden) == 2 and hidden[0].shape[:2] == (1, 8)
        refs = [weakref.ref(h) for h in hidden]
        del hidden, kwargs
        assert [r() is None for r in refs] == [True, True]
    finally:
        gc.enable()


def test_layer_inputs_in_groups_equal_one_batch_at_a_time(built, family):
    """Several batches per forward of the model's prefix (the H200's 1.75 s for 768 one-at-a-time forwards)
    give every batch's hidden states and layer arguments bit for bit as its own forward does; batches of
    another length start a group of their own."""
    import transformers

    from mtpquant.calib.stream.build import meta_skeleton
    from mtpquant.calib.stream.inputs import _same, embed_groups, layer_inputs

    src = Checkpoint(built[family]["base"])
    config = transformers.AutoConfig.from_pretrained(src.root)
    skeleton = meta_skeleton(getattr(transformers, config.architectures[0]), config)
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (8,) * 5 + (6,) * 3 + (8,) * 2:
        ids = torch.randint(0, src.config["vocab_size"], (1, n), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    batches[2]["attention_mask"] = batches[2]["attention_mask"].clone()
    batches[2]["attention_mask"][0, :3] = 0  # left padding: its mask differs from its group's others
    assert [len(x) for x in embed_groups(batches, 4)] == [4, 1, 3, 2]
    alone = layer_inputs(skeleton, config, src, batches, group=1)
    spans = {}
    grouped = layer_inputs(skeleton, config, src, batches, spans=spans, group=4)
    assert spans["embedding_forwards"] == 4  # grouped, not fallen back to one batch at a time
    assert len(grouped[0]) == 10 and _same(alone, grouped)
    assert grouped[0][1].data_ptr() != alone[0][1].data_ptr()  # really another forward


def test_an_error_before_the_first_layer_stops_the_early_read(built, monkeypatch, tmp_path):
    """The first layer is read while the calibration batches are embedded; an error there (here a fake one:
    embedding cannot fail on a valid fixture) reaches the user as itself, with no read thread left running and
    nothing written to the output."""
    from mtpquant.calib.stream import engine as stream

    def broken(*a, **k):
        raise MtpquantError("embedding failed")

    monkeypatch.setattr(stream, "layer_inputs", broken)
    base = built["glm4_moe"]["base"]
    with pytest.raises(MtpquantError, match="embedding failed"):
        quantize_stream(base, "w4a16-asym-g128", "tiny-local", tmp_path / "out")
    assert [t.name for t in threading.enumerate() if t.name.startswith("stream-")] == []
    assert not (tmp_path / "out").exists()


def test_each_layer_says_where_its_compute_went(streamed, family):
    """compute_* spans per layer: build, the passes, the solve (MoE layers only), pack; they add up to at most
    the layer's compute seconds."""
    rep = streamed[family]["report"]
    for e in rep["seconds"]["per_layer"]:
        phases = {k: v for k, v in e.items() if k.startswith("compute_") and k not in ("compute_start", "compute_end")}
        assert {"compute_build", "compute_propagation_pass", "compute_pack"} <= set(phases)
        assert sum(phases.values()) <= e["compute"] + 1e-2
    moe = [e for e in rep["seconds"]["per_layer"] if "compute_solve" in e]
    assert moe and all(e["compute_calibration_pass"] > 0 for e in moe)


def test_propagation_drops_each_input_as_its_output_is_made():
    """The propagation pass frees batch b's inputs once batch b's output exists (llm-compressor's pipeline
    deletes what a subgraph consumed): a layer's inputs and outputs are never both held whole (on the H200 one
    set of activations is 4.5 GiB at GLM-5.2's 393K tokens). The caller's own copy of the list (the writer's)
    keeps what it holds."""
    import gc
    import weakref

    from mtpquant.calib.stream.calibrate import _propagate

    hidden = [torch.randn(2, 4) for _ in range(4)]
    prev = [torch.randint(0, 9, (2, 3)) for _ in range(4)]
    writers = list(hidden[:1])  # the writer's list holds batch 0
    refs = [weakref.ref(h) for h in hidden]
    expected = [h * 2 for h in hidden]
    alive_at_call: list[list[bool]] = []

    def layer(h, prev_topk_indices=None, **kwargs):
        gc.collect()
        alive_at_call.append([r() is not None for r in refs])
        return h * 2, prev_topk_indices + 1

    outs, tops = _propagate(layer, hidden, [{"prev_topk_indices": None}] * 4, prev, "cpu", Placement())
    assert alive_at_call == [[True] * 4, [True, True, True, True], [True, False, True, True],
                             [True, False, False, True]]  # batch 0 stays: the writer's list holds it
    assert hidden == [None] * 4 and prev == [None] * 4
    assert all(torch.equal(o, e) for o, e in zip(outs, expected, strict=True))
    assert all(t.shape == (2, 3) for t in tops) and writers[0] is not None


def test_each_finished_layer_is_freed_without_the_cyclic_gc(built, family, tmp_path, monkeypatch):
    """When layer i+1 is solved, layers 0..i and every parameter they had after packing are gone with the cyclic
    GC off. Three cycles kept them until a collection happened to run: the GPTQ loss recorder's logger class
    closed over its {module: name} map, compressed-tensors' offload wrapper stores a forward closing over its
    module, llm-compressor's linearized experts store their parent's bound `_apply_gate`. On the H200 the GPU
    peak grew by one layer's packed bytes per MoE layer (17.69, 18.68, 19.66 GiB; then 17.69, 18.28, 18.87)."""
    import gc
    import weakref

    from mtpquant.calib.stream import engine as stream

    refs: list[weakref.ref] = []
    alive_at_pack: list[int] = []  # after the solve, where the GPU's peak is
    real_build, real_pack = stream.build_layer, stream.pack_layer

    def build_layer(*args, **kwargs):  # the real build, watched
        layer = real_build(*args, **kwargs)
        refs.append(weakref.ref(layer))
        return layer

    def pack_layer(skeleton, layer, i):  # the real pack, its layer's modules and parameters watched
        alive_at_pack.append(sum(r() is not None and r() is not layer for r in refs))
        out = real_pack(skeleton, layer, i)
        refs.extend(weakref.ref(o) for o in [*layer.modules(), *layer.parameters()])
        return out

    monkeypatch.setattr(stream, "build_layer", build_layer)
    monkeypatch.setattr(stream, "pack_layer", pack_layer)
    gc.collect()
    gc.disable()
    try:
        quantize_stream(built[family]["base"], "w4a16-asym-g128", "tiny-local", tmp_path / "q")
    finally:
        gc.enable()
    assert len(alive_at_pack) >= 3 and len(refs) > 100 and alive_at_pack == [0] * len(alive_at_pack), alive_at_pack
    assert sum(r() is not None for r in refs) == 0


def test_resume_deletes_boundaries_it_does_not_read(tmp_path):
    """An old boundary whose unlink (on a release thread) a kill cut off is deleted when the journal is
    reopened; the one resume reads stays."""
    work = tmp_path / "out.work"
    fp = {"recipe": "r1", "token_ids": "t1", "engine": "e"}
    j = Journal(work, fp, restart=False)
    for i in range(2):
        j.layers.append(_fake_layer(work, i) | {"activations": f"activations-after-{i:05d}.safetensors"})
        (work / f"activations-after-{i:05d}.safetensors").write_bytes(b"acts")
    j.layers[-1]["activations_sha256"] = hashlib.sha256(b"acts").hexdigest()
    j._write()
    j = Journal(work, fp, restart=False)
    j.drop_stale_entries()
    assert len(j.layers) == 2
    assert sorted(p.name for p in work.glob("activations-*")) == ["activations-after-00001.safetensors"]
