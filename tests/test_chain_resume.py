"""The chain re-run after an interruption: every stage whose recorded inputs are unchanged and whose outputs are as
it wrote them is skipped (and says so); a stage killed with SIGKILL is redone; the manifest's `files` section ends
equal to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mtpquant import cli

CHAIN = [["prepare", "--model", "tiny-glm4"], ["quantize"], ["inject-mtp"], ["verify"], ["manifest"]]


def run_chain(capsys, run: Path) -> str:
    out = []
    for argv in CHAIN:
        assert cli.main([argv[0], "--run", str(run), *argv[1:]]) == 0
        out.append(capsys.readouterr().err)
    return "".join(out)


def manifest_files(run: Path) -> dict:
    return json.loads((run / "artifact" / "manifest.json").read_text())["files"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted chain's manifest files (the fixture recipe is seeded: same bytes every time)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    for argv in CHAIN:
        assert cli.main([argv[0], "--run", str(run), *argv[1:]]) == 0
    return manifest_files(run)


# The stage runs as users run it, in its own process, and that process SIGKILLs itself at a chosen point of the
# real write (inside the output's temp dir): a deterministic kill, which a timer racing a tiny model is not.
KILL_AT = {"quantize": ("mtpquant.calib.quantize", "restore_dtypes", ".quantized.tmp-*"),
           "inject-mtp": ("mtpquant.chain.inject_mtp", "write_shard_from", ".artifact.tmp-*")}
KILLER = """
import importlib, os, signal, sys
mod = importlib.import_module(sys.argv[1])
real = getattr(mod, sys.argv[2])
def killed(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(mod, sys.argv[2], killed)
from mtpquant.cli import main
main(sys.argv[3:])
"""


def killed_during(run: Path, stage: list[str]) -> None:
    module, function, temp = KILL_AT[stage[0]]
    proc = subprocess.run([sys.executable, "-c", KILLER, module, function, stage[0], "--run", str(run), *stage[1:]],
                          capture_output=True, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert list(run.glob(temp)), "the kill left no temp dir: it did not happen mid-write"


def test_a_finished_chain_is_skipped_stage_by_stage(tmp_path, capsys, reference):
    run = tmp_path / "run"
    run_chain(capsys, run)
    again = run_chain(capsys, run)
    for stage in ("prepare", "quantize", "inject-mtp", "verify"):
        assert f"{stage}: done, inputs unchanged" in again, again
    assert manifest_files(run) == reference
    assert cli.main(["quantize", "--run", str(run), "--force"]) == 0  # --force redoes it
    assert "quantized" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [["quantize"], ["inject-mtp"]])
def test_killed_stage_is_redone_and_the_rest_skipped(tmp_path, capsys, reference, stage):
    run = tmp_path / "run"
    before = CHAIN[: [c[0] for c in CHAIN].index(stage[0])]
    for argv in before:
        assert cli.main([argv[0], "--run", str(run), *argv[1:]]) == 0
    capsys.readouterr()
    killed_during(run, stage)
    out = run_chain(capsys, run)
    for done in before:
        assert f"{done[0]}: done, inputs unchanged" in out
    assert f"{stage[0]}: done" not in out and "left by process" in out  # redone; the dead one's temp removed
    assert manifest_files(run) == reference
    assert not list(run.glob(".*.tmp-*"))
