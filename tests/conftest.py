"""Shared tiny models: each family's fixture is generated, quantized with the real llm-compressor and
injected once per test session; tests that tamper with an artifact work on a copy."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mtpquant.core.run import Run
from mtpquant.model.recipes import FixtureSpec
from tests.heartbeat import HEARTBEAT_S, Beater, Heartbeat

FAMILIES = ["glm_moe_dsa", "glm4_moe"]


_HEARTBEAT = Heartbeat()


def pytest_configure(config: pytest.Config) -> None:
    """Start the slow-test heartbeat (tests/heartbeat.py) on a copy of the terminal's fd (capture is suspended
    here, so fd 1 is still the terminal)."""
    if HEARTBEAT_S > 0 and not hasattr(config, "workerinput"):
        config._mtpquant_beater = Beater(_HEARTBEAT, os.dup(1))  # type: ignore[attr-defined]
        config._mtpquant_beater.thread.start()  # type: ignore[attr-defined]
        _HEARTBEAT.begin("collecting tests (importing torch, transformers)")


def pytest_collection_finish(session: pytest.Session) -> None:
    _HEARTBEAT.end()


def pytest_unconfigure(config: pytest.Config) -> None:
    beater = getattr(config, "_mtpquant_beater", None)
    if beater is not None:
        beater.close()


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    _HEARTBEAT.begin(nodeid)


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    _HEARTBEAT.end()


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """family -> {base, quantized, artifact, quantize_report} for the default tiny spec."""
    from mtpquant.calib.quantize import quantize  # torch and co. here, not as conftest loads (under the heartbeat)
    from mtpquant.chain.inject_mtp import inject_mtp
    from mtpquant.tiny.fixture import write_fixture

    out = {}
    for fam in FAMILIES:
        run = Run(tmp_path_factory.mktemp(fam))
        base = write_fixture(fam, FixtureSpec(), run.base)
        quantize_report = run.record("quantize", quantize(base, "w4a16-asym-g128", "tiny-local", run.quantized))
        run.record("inject-mtp", inject_mtp(base, run.quantized, run.artifact))
        out[fam] = {"base": base, "quantized": run.quantized, "artifact": run.artifact,
                    "quantize_report": quantize_report, "root": run.root}
    return out


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def artifact_copy(built, family, tmp_path) -> tuple[Path, Path]:
    """(a writable copy of the family's artifact, its base)."""
    dst = tmp_path / "artifact"
    shutil.copytree(built[family]["artifact"], dst)
    return dst, built[family]["base"]


def edit_tensors(ckpt: Path, remove: list[str] = (), add: dict | None = None, shard: str | None = None) -> None:
    """Rewrite a checkpoint's shards and index: drop `remove`, add `add` (into `shard` or the first shard)."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    from safetensors.torch import load_file, save_file

    touched = {wm[n] for n in remove}
    add = add or {}
    target = shard or sorted(set(wm.values()))[0]
    if add:
        touched.add(target)
    for sh in touched:
        tensors = load_file(str(ckpt / sh))
        for n in remove:
            if wm.get(n) == sh:
                tensors.pop(n)
        if sh == target:
            tensors.update(add)
        save_file(tensors, str(ckpt / sh), metadata={"format": "pt"})
    for n in remove:
        wm.pop(n)
    wm.update(dict.fromkeys(add, target))
    index_path.write_text(json.dumps(index))


def mtp_prefix(ckpt: Path) -> str:
    """A checkpoint's (first) MTP prefix, asked of its family: `model.layers.3.` in the tiny GLM fixtures."""
    from mtpquant.core.checkpoint import read_json
    from mtpquant.model.families import family_for

    config = read_json(Path(ckpt) / "config.json")
    return family_for(config).mtp_prefixes(config)[0]


def read_tensor(ckpt: Path, name: str):
    from safetensors.torch import load_file

    wm = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return load_file(str(ckpt / wm[name]))[name]
