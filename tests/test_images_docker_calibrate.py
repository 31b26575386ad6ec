"""The CPU calibration image on a real engine (marker `docker`: CI runs these after .ci/docker-setup, which
starts dockerd and a loopback registry and makes the CPU base from Debian packages).

Built air-gapped from the wheelhouse, pushed to the registry, removed, pulled back by digest, it runs the tiny
chain (prepare -> quantize -> inject-mtp -> verify) as its non-root user: the artifact equals the venv's byte
for byte. A second build from scratch gives the same image id and the same registry digest."""

from __future__ import annotations

import json
import time

import pytest

from mtpquant import images
from mtpquant.core.checkpoint import file_sha256
from mtpquant.core.errors import MtpquantError
from tests.docker_support import REGISTRY, base, built_image, leave_no_images, log, publish_remove_pull, record

pytestmark = pytest.mark.docker
__all__ = ["leave_no_images"]  # the module's cleanup fixture


@pytest.fixture(scope="module")
def calibrate():
    s, image_id = built_image("calibrate")
    return s, image_id


def test_calibrate_image_is_labelled_non_root_and_lean(calibrate):
    s, image_id = calibrate
    attrs = images.client().images.get(image_id).attrs
    labels = attrs["Config"]["Labels"]
    assert attrs["Config"]["User"] == "10001:10001"
    assert labels["io.mtpquant.lock.sha256"] == file_sha256(images.PINNED / "calibrate-cpu.txt")
    assert labels["org.opencontainers.image.revision"] == images.revision()
    assert labels["org.opencontainers.image.base.name"] == base()
    # Runs as 10001; no compiler; nothing of the build stage (wheelhouse, lock copy, extra CAs) left in /tmp.
    probe = ["sh", "-c", "id -u; command -v gcc cc g++ make; ls -A /tmp; echo end"]
    out: list[str] = []
    assert images.run(s.local_ref, probe, [], log=out.append) == 0
    assert out == ["10001", "end"], out


def test_calibrate_image_push_remove_pull_by_digest_runs_the_chain(calibrate, built, tmp_path):
    s, image_id = calibrate
    digest_ref = publish_remove_pull(s, image_id, tmp_path)
    record("calibrate-cpu.digest", digest_ref)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)  # the image's own non-root user writes here
    t0 = time.monotonic()
    for argv in (["prepare", "--model", "tiny-glm5"], ["quantize"], ["inject-mtp"], ["verify"]):
        code = images.run(s.local_ref, ["python", "-m", "mtpquant", *argv, "--run", str(run)], [str(run)], log=log)
        assert code == 0, argv
    record("calibrate-cpu.chain_seconds", round(time.monotonic() - t0, 1))
    venv = built["glm_moe_dsa"]["artifact"]
    ours = {p.name: file_sha256(p) for p in sorted((run / "artifact").iterdir())}
    theirs = {p.name: file_sha256(p) for p in sorted(venv.iterdir())}
    assert ours == theirs  # the same artifact, byte for byte, in the image and in the venv
    report = json.loads((run / "verify.json").read_text())
    assert report["ok"] and report["checks"] and all(c["ok"] for c in report["checks"])


def test_pull_refuses_a_published_image_built_from_other_inputs(calibrate):
    s, _ = calibrate
    other = images.BuildSpec(**{**s.__dict__, "tag": "0" * 16})
    lock = {"published": {s.key: {"ref": f"{REGISTRY}/{s.repo}@sha256:" + "e" * 64, "content_tag": "f" * 16}}}
    with pytest.raises(MtpquantError, match="built from other inputs"):
        images.pull(other, log=log, build_fallback=False, images_lock=lock)


def test_second_build_from_scratch_is_identical(calibrate):
    s, image_id = calibrate
    first = images.push(s, f"{REGISTRY}/first", log=log)
    t0 = time.monotonic()
    again = images.build(s, log=log, no_cache=True, keep_cache=False)
    record("calibrate-cpu.rebuild_seconds", round(time.monotonic() - t0, 1))
    second = images.push(s, f"{REGISTRY}/second", log=log)
    record("calibrate-cpu.rebuild_identical", {"image_id": [image_id, again],
                                              "digest": [first.split("@")[1], second.split("@")[1]]})
    assert again == image_id
    assert first.split("@")[1] == second.split("@")[1]
