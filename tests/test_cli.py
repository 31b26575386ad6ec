"""The stages as users type them: `python -m mtpquant <stage>`, in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

from mtpquant.core.checkpoint import Checkpoint, file_sha256
from mtpquant.model.families import FAMILIES
from mtpquant.model.recipes import FixtureSpec
from mtpquant.tiny.fixture import write_fixture
from tests.conftest import mtp_prefix


def mtpquant(*args, check=True, **env_vars):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_vars)
    proc = subprocess.run([sys.executable, "-m", "mtpquant", *map(str, args)], capture_output=True, text=True,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("family,layers,dense,mtp", [("glm_moe_dsa", 2, 1, 2), ("glm4_moe", 5, 2, 1)])
def test_chain_through_cli(tmp_path, family, layers, dense, mtp):
    run = tmp_path / "run"
    mtpquant("fixture", "--family", family, "--out", run / "base", "--layers", layers, "--dense-layers", dense,
             "--mtp-layers", mtp, "--experts", 4)
    said = mtpquant("quantize", "--run", run).stderr  # --engine auto: a tiny model fits any host
    assert "; engine memory (--engine auto: the memory engine needs ~" in " ".join(said.split()), said
    assert json.loads((run / "quantize.json").read_text())["engine_chosen"].startswith("--engine auto: the memory")
    mtpquant("inject-mtp", "--run", run)
    out = mtpquant("verify", "--run", run).stdout
    assert "FAIL" not in out and out.count("PASS") == 9
    mtpquant("manifest", "--run", run)

    art = Checkpoint(run / "artifact")
    fam = FAMILIES[family]
    assert fam.mtp_layers(art.config) == list(range(layers, layers + mtp))
    n_linears = (layers - dense) * 4 * 3
    assert json.loads((run / "quantize.json").read_text())["quantized_linears"] == n_linears
    assert sum(n.endswith(".weight_packed") for n in art.tensors) == n_linears
    ignore = art.config["quantization_config"]["ignore"]
    for layer in range(layers, layers + mtp):
        assert f"re:^model\\.layers\\.{layer}\\..*" in ignore
    manifest = json.loads((run / "artifact" / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == file_sha256(run / "artifact" / name)
    assert set(manifest["files"]) == {p.name for p in (run / "artifact").iterdir()} - {"manifest.json"}
    assert manifest["produced_by"]["packages"]["llmcompressor"] == "0.14.0.1"
    assert "quantize" in manifest["produced_by"]["stages"]
    consumed = json.loads((run / "quantize.json").read_text())["consumed"]
    assert any(k.endswith("w4a16-asym-g128.yaml") for k in consumed)


def test_verify_failure_exit_code_names_tensor(built, tmp_path):
    proc = mtpquant("verify", "--artifact", built["glm4_moe"]["quantized"], "--base", built["glm4_moe"]["base"],
                    "--run", tmp_path, check=False)
    assert proc.returncode == 3
    assert mtp_prefix(built["glm4_moe"]["base"]) in proc.stderr and "is missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "verify.json").read_text())["ok"] is False


@pytest.mark.parametrize("args,expected", [
    (["quantize", "--run", "{tmp}", "--model", "{tmp}/nope"], "nope: checkpoint directory not found"),
    (["quantize", "--run", "{tmp}", "--model", "{base}", "--recipe", "no-such"], "no-such.yaml: recipe file not found"),
    (["inject-mtp", "--run", "{tmp}", "--base", "{base}", "--quantized", "{base}"], "no quantization_config"),
    (["prepare", "--run", "{tmp}", "--model", "glm-5.2"], "source.revision is UNPINNED"),
    (["preflight", "--model", "glm-5.2", "--calibration", "glm5-code-instruct"], "no CUDA GPU visible"),
    (["fixture", "--family", "glm4_moe", "--out", "{tmp}/f", "--dense-layers", "3"], "first_k_dense_replace"),
    (["quantize", "--run", "{tmp}", "--model", "{base}", "--engine", "memory", "--split", "experts"],
     "--split: only the stream engine takes it"),
    (["quantize", "--run", "{tmp}", "--model", "{base}", "--read-threads", "0"], "--read-threads: expected at least 1"),
])
def test_user_mistakes_are_one_line_errors(built, tmp_path, args, expected):
    args = [a.format(tmp=tmp_path, base=built["glm4_moe"]["base"]) for a in args]
    proc = mtpquant(*args, check=False, CUDA_VISIBLE_DEVICES="")  # no GPU, also on a machine that has one
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_no_half_written_output_on_failure(built, tmp_path):
    """A stage that fails leaves no output directory that looks finished (nor a temp one)."""
    base = write_fixture("glm4_moe", FixtureSpec(), tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    del cfg[FAMILIES["glm4_moe"].mtp_key]
    (base / "config.json").write_text(json.dumps(cfg))
    proc = mtpquant("inject-mtp", "--run", tmp_path, "--quantized", built["glm4_moe"]["quantized"], check=False)
    assert proc.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
