"""`quantize --engine stream` under torchrun: 2 real gloo ranks (CPU processes, torchrun's env:// rendezvous)
against the stream engine in one process on the same fixture.

The split (decoder layer i on rank i % world, mtpquant.calib.stream) runs the same ops on the same inputs in the
same order as one process, so the artifact is expected byte for byte the same, and asserted: every file's
sha256. That holds for the same number of CPU threads per process (the CPU matmul kernels split their sums by
thread, and torchrun sets OMP_NUM_THREADS=1 unless told otherwise): the ranks get this process's. Each rank
records the source tensors it read; the report carries them (`per_rank`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtpquant.calib.ranks import batch_owners
from mtpquant.calib.stream.engine import quantize_stream
from mtpquant.calib.stream.journal import JOURNAL, work_dir_for
from mtpquant.calib.stream.reader import layer_names, names_sha256
from mtpquant.chain.inject_mtp import inject_mtp
from mtpquant.chain.verify import verify
from mtpquant.core.checkpoint import Checkpoint
from mtpquant.model.families.base import LAYERS
from mtpquant.model.recipes import FixtureSpec
from mtpquant.tiny.fixture import write_fixture
from tests.test_stream import file_hashes

REPO = Path(__file__).resolve().parents[1]
FAMILY = "glm_moe_dsa"  # 3 decoder layers: rank 0 gets 0 (dense) and 2, rank 1 gets 1


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny GLM-5 base, the stream engine's artifact from it in this one process)."""
    root = tmp_path_factory.mktemp("ranks")
    base = write_fixture(FAMILY, FixtureSpec(), root / "base")
    quantize_stream(base, "w4a16-asym-g128", "tiny-local", root / "one")
    return base, root / "one"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(torch.get_num_threads()),
            **(extra or {})}


def _quantize_args(run: Path, base: Path, out: Path) -> list[str]:
    # `--`: torchrun's own parser would take `--run` for an abbreviation of its `--run-path`
    return ["-m", "mtpquant", "--", "quantize", "--run", str(run), "--model", str(base), "--out", str(out),
            "--engine", "stream"]


def _torchrun(run: Path, base: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # --standalone: a free rendezvous port (a fixed one can be taken by another job on the machine)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *_quantize_args(run, base, out)], env=_env(env), capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def _expected_reads(base: Path, rank: int) -> list[str]:
    source = Checkpoint(base)
    names = ["model.embed_tokens.weight"]
    for i in range(source.config["num_hidden_layers"]):
        if i % 2 == rank:
            names += layer_names(source, i)
    if rank == 0:  # the tensors outside the decoder layers (the MTP layer is inject-mtp's)
        names += [n for n in source.weight_map if not n.startswith(LAYERS)]
    return sorted(set(names))


def test_two_gloo_ranks_give_the_one_process_artifact(one, tmp_path):
    base, reference = one
    run, out = tmp_path / "run", tmp_path / "q"
    proc = _torchrun(run, base, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert file_hashes(out) == file_hashes(reference)
    assert not work_dir_for(out).exists()
    rep = json.loads((run / "quantize.json").read_text())
    assert rep["ranks"] == 2 and rep["quantized_linears"] == rep["expected_linears"] == 48
    n = Checkpoint(base).config["num_hidden_layers"]
    # each rank read its own layers' tensors (and the embedding), never another rank's, never the MTP layer
    for r, part in enumerate(rep["per_rank"]):
        assert part["rank"] == r
        assert part["reads"]["layers"] == [i for i in range(n) if i % 2 == r]
        assert part["reads"]["names_sha256"] == names_sha256(_expected_reads(base, r))
        assert part["reads"]["tensors"] == len(_expected_reads(base, r))
    total = sum(t.nbytes for t in Checkpoint(base).tensors.values())
    assert all(part["reads"]["bytes"] < total for part in rep["per_rank"])

    inject_mtp(base, out, tmp_path / "artifact")
    checks = verify(tmp_path / "artifact", base)
    assert all(c.ok for c in checks), [c.failures for c in checks if c.failures]


def test_a_killed_rank_then_rerun_resumes_to_the_same_files(one, tmp_path):
    base, reference = one
    run, out = tmp_path / "run", tmp_path / "q"
    work = work_dir_for(out)
    layers = lambda: [e["layer"] for e in json.loads((work / JOURNAL).read_text())["layers"]]  # noqa: E731
    # rank 1 SIGKILLed while it writes layer 1's shard: torchrun stops rank 0; layer 1 is not journaled (layer 0
    # is once rank 0 has computed layer 2, if torchrun's stop did not come first)
    proc = _torchrun(run, base, out, {"MTPQUANT_STREAM_KILL": "write:1"})
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    assert layers() in ([], [0])
    # rerun: resumes at layer 1; rank 0 (the journal's writer) SIGKILLed right after journaling layer 1
    proc = _torchrun(run, base, out, {"MTPQUANT_STREAM_KILL": "after:1"})
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    assert layers() == [0, 1] and not out.exists()
    proc = _torchrun(run, base, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((run / "quantize.json").read_text())
    assert rep["resumed_after_layers"] == 2 and rep["ranks"] == 2
    assert rep["per_rank"][1]["reads"]["layers"] == []  # nothing left for rank 1: it read no layer
    assert file_hashes(out) == file_hashes(reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_that_do_not_share_the_work_dir_refuse_in_one_line(one, tmp_path):
    """Two torchrun nodes (static rendezvous on this host, as across machines), each given its own --out on a
    disk the other does not see: rank 1 finds no journal where rank 0 wrote one, and both refuse."""
    base = one[0]
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={k}",
                               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                               *_quantize_args(tmp_path / f"run{k}", base, tmp_path / f"node{k}" / "q")],
                              env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode != 0
        lines = [ln for ln in err.splitlines() if "rank 1 sees no journal in" in ln]
        assert lines, err[-3000:]
        assert "rank 0 sees 0: every rank must see one work dir" in lines[0]
    assert not (tmp_path / "node0" / "q").exists() and not (tmp_path / "node1" / "q").exists()


def test_batch_owners_give_each_rank_whole_batches():
    owners = batch_owners(256, 21, 8)  # GLM-5.2's down_proj: 256 experts, 21 a batch (131072 rows // 6144)
    per_rank = [owners.count(r) for r in range(8)]
    assert sum(per_rank) == 256 and max(per_rank) == 42 and min(per_rank) > 0  # 13 batches: at most 2 a rank
    assert owners == sorted(owners)  # contiguous runs
    assert all(len({owners[k] for k in range(b, min(b + 21, 256))}) == 1 for b in range(0, 256, 21))
    assert batch_owners(5, 8, 4) == [0] * 5  # one batch: one owner, the other ranks idle
    assert batch_owners(16, 4, 2) == [0] * 8 + [1] * 8


def test_expert_split_on_two_gloo_ranks_gives_the_one_process_artifact(tmp_path):
    """`--split experts`: both ranks run every layer on every token; each forms the Hessians of and solves only
    its half of the experts (solve_rows 512: down_proj in batches of 2 experts, gate/up in batches of 4 Linears,
    4 batches each) and the owners broadcast the results. No sum crosses ranks, so the files are the one-process
    files, byte for byte."""
    base = write_fixture(FAMILY, FixtureSpec(), tmp_path / "base")
    recipe = tmp_path / "split.yaml"
    text = (REPO / "recipes" / "quant" / "w4a16-asym-g128.yaml").read_text()
    assert "solve_rows: 131072" in text
    recipe.write_text(text.replace("solve_rows: 131072", "solve_rows: 512"))
    one = quantize_stream(base, str(recipe), "tiny-local", tmp_path / "one")
    run, out = tmp_path / "run", tmp_path / "q"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *_quantize_args(run, base, out), "--recipe", str(recipe), "--split", "experts"],
                          env=_env(), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert file_hashes(out) == file_hashes(tmp_path / "one")
    rep = json.loads((run / "quantize.json").read_text())
    assert rep["split"] == "experts" and rep["ranks"] == 2
    assert rep["quantized_linears"] == rep["expected_linears"] == 48
    assert [part["solved_linears"] for part in rep["per_rank"]] == [24, 24]  # each rank half of the experts
    n = Checkpoint(base).config["num_hidden_layers"]
    assert all(part["reads"]["layers"] == list(range(n)) for part in rep["per_rank"])
    losses = lambda rows: {r["module"]: r["loss"] for r in rows}  # noqa: E731
    assert losses(rep["per_linear"]) == losses(one["per_linear"]) and len(losses(one["per_linear"])) == 48


def test_expert_split_needs_the_fast_experts_section(tmp_path):
    base = write_fixture(FAMILY, FixtureSpec(), tmp_path / "base")
    recipe = tmp_path / "plain.yaml"
    text = (REPO / "recipes" / "quant" / "w4a16-asym-g128.yaml").read_text()
    recipe.write_text(text.split("\nfast_experts:")[0] + "\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *_quantize_args(tmp_path / "run", base, tmp_path / "q"), "--recipe", str(recipe),
                           "--split", "experts"], env=_env(), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "--split experts needs a fast_experts section" in ln]
    assert len(lines) == 2 and all(ln.startswith(f"error: {recipe}: ") for ln in lines), proc.stderr[-3000:]
    assert f'File "{REPO / "src"}' not in proc.stderr  # one line per rank (torchrun's launcher adds its own trace)


def test_timed_share_does_one_ranks_solves_in_one_process(tmp_path, monkeypatch):
    """MTPQUANT_STREAM_TIMED_SHARE (benchmarks: a rank's GPU work of the expert split, timed on one GPU): the
    process solves only rank 0's half of the experts and says so in its report."""
    base = write_fixture(FAMILY, FixtureSpec(), tmp_path / "base")
    recipe = tmp_path / "split.yaml"
    recipe.write_text((REPO / "recipes" / "quant" / "w4a16-asym-g128.yaml").read_text()
                      .replace("solve_rows: 131072", "solve_rows: 512"))
    monkeypatch.setenv("MTPQUANT_STREAM_TIMED_SHARE", "0/2")
    rep = quantize_stream(base, str(recipe), "tiny-local", tmp_path / "q")
    assert rep["timed_share"] == (0, 2) and rep["per_rank"][0]["solved_linears"] == 24
    assert rep["quantized_linears"] == 24 < rep["expected_linears"] == 48
