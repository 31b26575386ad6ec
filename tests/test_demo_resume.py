"""`make demo` re-run after an interruption: the demo's own chain (the argvs `envs.chain` gives its tiny-glm4 entry,
each a `python -m mtpquant` process as the nox session runs it) SIGKILLed during quantize and, separately, during
inject-mtp, then re-run: the finished stages say they were skipped, only the unfinished ones are redone, and the
manifest's `files` section equals an uninterrupted run's. Plus what `nox -s demo [-- --fresh]` does to the run dirs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mtpquant import cli
from mtpquant.pins import envs
from tests.test_chain_resume import KILL_AT

RUN, MODEL, CALIBRATION = next(d for d in envs.DEMO if d[1] == "tiny-glm4")
STAGES = [*envs.STAGES]  # prepare, quantize, inject-mtp, verify, manifest: the demo chain's order

# Loaded at interpreter start (a `sitecustomize` on PYTHONPATH) by the unmodified `python -m mtpquant` command:
# when the module named in MTPQUANT_TEST_KILL_AT is imported, its function is wrapped so that the process
# SIGKILLs itself right after that step of the real write (inside the output's temp dir). Deterministic, unlike a
# timer racing a tiny model, and the argv stays exactly the demo's.
HOOK = '''
import importlib.abc, importlib.machinery, os, signal, sys
MODULE, FUNCTION = os.environ["MTPQUANT_TEST_KILL_AT"].split(":")


class KillAfter(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            real = getattr(module, FUNCTION)

            def killed(*a, **k):
                real(*a, **k)
                os.kill(os.getpid(), signal.SIGKILL)

            setattr(module, FUNCTION, killed)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, KillAfter())
'''


def demo_chain(run: Path) -> list[list[str]]:
    """The python argv of each stage of the demo's tiny-glm4 chain, as the nox session runs them here."""
    return [envs.stage_argv("local", argv) for argv in envs.chain(str(run), MODEL, CALIBRATION)]


def stage(argv: list[str], kill_at: str | None = None, hook: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = str(Path(cli.__file__).parents[1])  # the package under test, whether installed or on PYTHONPATH
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(hook) if kill_at else "", src, env.get("PYTHONPATH", "")]
                                        if p)
    if kill_at:
        env["MTPQUANT_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=600)


def run_all(argvs: list[list[str]]) -> str:
    out = []
    for argv in argvs:
        proc = stage(argv)
        assert proc.returncode == 0, f"{argv}:\n{proc.stderr[-3000:]}"
        out.append(proc.stdout + proc.stderr)
    return "".join(out)


def manifest_files(run: Path) -> dict:
    return json.loads((run / "artifact" / "manifest.json").read_text())["files"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted demo chain's manifest files (the fixture recipe is seeded: same bytes every time); run in
    this process, the same argvs, to spare five interpreter starts."""
    run = tmp_path_factory.mktemp("reference") / "demo-tiny-glm4"
    for argv in envs.chain(str(run), MODEL, CALIBRATION):
        assert cli.main(argv) == 0
    return manifest_files(run)


@pytest.fixture(scope="module")
def hook(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hook")
    (d / "sitecustomize.py").write_text(HOOK)
    return d


@pytest.mark.parametrize("killed", ["quantize", "inject-mtp"])
def test_demo_chain_killed_then_rerun_redoes_only_the_unfinished_stages(tmp_path, reference, hook, killed):
    run = tmp_path / "demo-tiny-glm4"
    chain = demo_chain(run)
    k = STAGES.index(killed)
    run_all(chain[:k])
    module, function, temp = KILL_AT[killed]
    proc = stage(chain[k], kill_at=f"{module}:{function}", hook=hook)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert list(run.glob(temp)), "the kill left no temp dir: it did not happen mid-write"

    out = run_all(chain)  # the re-run: the whole chain, as `make demo` runs it again
    for done in STAGES[:k]:
        assert f"{done}: done, inputs unchanged" in out, out[-3000:]
    for redone in STAGES[k:]:
        assert f"{redone}: done" not in out, out[-3000:]
    assert "left by process" in out  # the dead process's temp dir was removed, and it said so
    assert manifest_files(run) == reference
    assert not list(run.glob(".*.tmp-*"))


def test_demo_keeps_its_run_dirs_unless_fresh(tmp_path, monkeypatch):
    dirs = [tmp_path / "demo-a", tmp_path / "demo-b"]
    monkeypatch.setattr(envs, "DEMO", [(str(d), "tiny-glm4", "tiny-local") for d in dirs])
    assert envs.demo_start([]) == []  # nothing to resume
    dirs[0].mkdir()
    (dirs[0] / "prepare.json").write_text("{}")
    said = envs.demo_start(["--runtime", "local"])
    assert "resuming" in said[0] and "--fresh" in said[0] and (dirs[0] / "prepare.json").exists()
    said = envs.demo_start(["--fresh"])
    assert said[0].startswith("--fresh: removed") and not dirs[0].exists()
    with pytest.raises(envs.EnvError, match="unknown option --frsh"):
        envs.demo_start(["--frsh"])


def test_noxfile_demo_removes_nothing_itself():
    """The one place that may remove the demo's run dirs is `envs.demo_start` (on `-- --fresh`)."""
    text = (Path(__file__).resolve().parents[1] / "noxfile.py").read_text()
    assert "rmtree" not in text and "envs.demo_start" in text
