"""mtpquant.pins.envs: one environment per lock set, rebuilt only when its locks change; what sessions' `-- ARGS`
become; the preflight that needs no heavy package; the noxfile stays a list of short sessions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mtpquant.pins import envs

ROOT = Path(__file__).resolve().parents[1]


def fake_env(tmp_path: Path, monkeypatch) -> tuple[envs.EnvSpec, list[str]]:
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    (pinned / "a.txt").write_text("alpha==1.0 \\\n    --hash=sha256:00\nbeta==2.0\n")
    (pinned / "b.txt").write_text("gamma==3.0\n")
    monkeypatch.setattr(envs, "PINNED", pinned)
    spec = envs.EnvSpec("fake", tmp_path / "venv", ("a", "b"))
    monkeypatch.setitem(envs.ENVS, "fake", spec)
    built: list[str] = []

    def install(s, say):
        built.append(envs.lock_sha256(s))
        (s.path / "bin").mkdir(parents=True, exist_ok=True)
        s.python.write_text("")
        (s.path / "lock.sha256").write_text(envs.lock_sha256(s))

    monkeypatch.setattr(envs, "install", install)
    monkeypatch.setattr(envs, "editable", lambda s, say: None)
    return spec, built


def test_env_is_rebuilt_only_when_a_lock_changes(tmp_path, monkeypatch):
    spec, built = fake_env(tmp_path, monkeypatch)
    assert envs.pins(spec) == ["alpha==1.0", "beta==2.0", "gamma==3.0"]
    assert envs.ensure("fake", say=lambda _: None) == str(spec.python)
    envs.ensure("fake", say=lambda _: None)
    assert len(built) == 1  # same locks: the stamp matches, nothing is installed
    (envs.PINNED / "b.txt").write_text("gamma==3.1\n")
    envs.ensure("fake", say=lambda _: None)
    assert len(built) == 2 and built[0] != built[1]


def test_every_session_that_needs_the_calibration_lock_shares_one_env():
    assert envs.ENVS["calibrate"].path == ROOT / ".venv"
    assert envs.ENVS["calibrate"].locks == ("calibrate-cpu", "dev")
    paths = [e.path for e in envs.ENVS.values()]
    assert len(set(paths)) == len(paths)
    assert {env for env, _, _ in envs.commands().values()} <= set(envs.ENVS)


def test_serve_sessions_come_from_the_profiles():
    profiles = sorted(p.stem for p in (ROOT / "recipes" / "serve").glob("*.yaml"))
    commands = envs.commands()
    for profile in profiles:
        env, argv, doc = commands[f"serve-{profile}"]
        assert argv == ["serve", "--profile", profile] and "\n" not in doc
    assert commands["serve-cpu"][0] == "serve" and commands["serve-h200x8"][0] == "calibrate"


def test_posargs():
    assert envs.images_commands(["--plan", "--image", "serve"]) == [["plan", "--image", "serve"]]
    assert envs.images_commands(["--image", "serve", "--push", "R:5000"]) == [
        ["build", "--image", "serve"], ["push", "--registry", "R:5000", "--image", "serve"]]
    with pytest.raises(envs.EnvError, match="--push needs a registry"):
        envs.images_commands(["--push"])
    assert envs.lock_command([]) == ["write"]
    assert envs.lock_command(["--check", "--strict"]) == ["drift", "--strict"]
    assert envs.split_runtime(["--runtime", "local", "--run", "x"]) == ("local", ["--run", "x"])
    with pytest.raises(envs.EnvError, match="--runtime"):
        envs.split_runtime(["--runtime", "podman"])
    assert envs.stage_argv("local", ["verify", "--run", "x"]) == ["-m", "mtpquant", "verify", "--run", "x"]
    assert [a[0] for a in envs.chain("r", "m", "c")] == ["prepare", "quantize", "inject-mtp", "verify", "manifest"]


def test_cheap_preflight(monkeypatch):
    monkeypatch.setattr(envs.runtime, "has_gpus", lambda: False)
    with pytest.raises(envs.EnvError, match="no NVIDIA GPU visible"):
        envs.cheap_preflight("glm-5.2", "glm5-code-instruct")
    monkeypatch.setattr(envs.runtime, "has_gpus", lambda: True)
    with pytest.raises(envs.EnvError, match=r"glm-5.2.yaml:\d+: revision is UNPINNED"):
        envs.cheap_preflight("glm-5.2", "glm5-code-instruct")
    assert len(envs.cheap_preflight("tiny-glm5", "tiny-local")) == 2


def test_noxfile_is_short_sessions():
    text = (ROOT / "noxfile.py").read_text()
    assert len(text.splitlines()) < 120
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.decorator_list:
            doc = ast.get_docstring(node)
            assert doc and "\n" not in doc, f"session {node.name}: one-line docstring"
            assert len(node.body) <= 6, f"session {node.name}: logic belongs in mtpquant.pins.envs"
