"""`publish --dry-run` on a real run: base prepared from a hub cache (offline, huggingface_hub's code), the session's
quantized artifact of that same base, real verify / manifest / report; the card parsed back by huggingface_hub's
ModelCard. The upload itself needs the hub (not reachable here): not run."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from huggingface_hub import ModelCard

from mtpquant import cli
from mtpquant.chain.publish import publish
from mtpquant.core.errors import MtpquantError
from mtpquant.core.run import Run
from tests.conftest import mtp_prefix
from tests.test_hub import COMMIT, REPO, make_hub_cache, prepare, write_lock


@pytest.fixture
def run(tmp_path, built) -> Run:
    """A run whose base came from the hub cache and whose artifact is the session's glm4_moe artifact of it."""
    src = built["glm4_moe"]["base"]
    cache = tmp_path / "hub"
    make_hub_cache(src, cache, REPO, COMMIT)
    lock = write_lock(src, tmp_path / "tiny.lock", REPO, COMMIT)
    recipe = tmp_path / "tiny-hub.yaml"
    recipe.write_text(f"name: tiny-hub\nfamily: glm4_moe\nlicense: apache-2.0\nsource:\n  hub: {REPO}\n"
                      f"  revision: {COMMIT}\n  lock: {lock}\n")
    r = prepare(cache, recipe, tmp_path / "run")
    assert r.returncode == 0, r.stderr
    run = Run(tmp_path / "run")
    shutil.copytree(built["glm4_moe"]["artifact"], run.artifact)
    shutil.copy(built["glm4_moe"]["root"] / "quantize.json", run.record_path("quantize"))
    for stage in (["verify", "--run", str(run.root)], ["manifest", "--run", str(run.root)],
                  ["report", "--run", str(run.root)]):
        assert cli.main(stage) == 0, stage
    return run


def test_dry_run_lists_every_file_and_a_card_the_hub_parses(run, capsys):
    plan = publish(run, "me/tiny-w4a16", dry_run=True)
    manifest = json.loads((run.artifact / "manifest.json").read_text())
    listed = {f["path"]: f for f in plan["files"]}
    assert set(listed) == set(manifest["files"]) | {"manifest.json"}
    for name, f in listed.items():
        assert f["sha256"] == hashlib.sha256((run.artifact / name).read_bytes()).hexdigest()
    card = ModelCard(plan["card"])
    assert card.data.license == "apache-2.0"
    assert card.data.base_model == REPO and card.data.base_model_relation == "quantized"
    assert {"w4a16", "mtp", "compressed-tensors"} <= set(card.data.tags)
    q = card.data.to_dict()["quantization"]
    assert q["base_revision"] == COMMIT and q["format"] == "pack-quantized"
    assert q["quantized_linears"] == json.loads(run.record_path("quantize").read_text())["quantized_linears"]
    assert card.text.strip() == run.report.read_text().strip()
    assert cli.main(["publish", "--run", str(run.root), "--repo", "me/tiny-w4a16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "base_model_relation: quantized" in out and "mtp-00001-of-00001.safetensors" in out


def test_refuses_an_artifact_that_failed_verify(run):
    index = run.artifact / "model.safetensors.index.json"
    wm = json.loads(index.read_text())
    mtp = [n for n in wm["weight_map"] if n.startswith(mtp_prefix(run.artifact))]
    for n in mtp[:3]:
        del wm["weight_map"][n]
    index.write_text(json.dumps(wm))
    assert cli.main(["verify", "--run", str(run.root), "--force"]) == 3
    with pytest.raises(MtpquantError, match="verify failed"):
        publish(run, "me/x", dry_run=True)


def test_refuses_an_artifact_that_changed_after_its_manifest(run):
    shard = sorted(run.artifact.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(MtpquantError) as e:
        publish(run, "me/x", dry_run=True)
    assert e.value.exit_code == 3 and shard.name in str(e.value)


def test_refuses_an_unverified_run(run):
    run.record_path("verify").unlink()
    with pytest.raises(MtpquantError, match="verify"):
        publish(run, "me/x", dry_run=True)
