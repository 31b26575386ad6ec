"""The CUDA images `nox -s images-cuda` built and pushed (marker `docker_cuda`, not in `make test` nor CI: the
builds take ~1 h here). Each is pulled from the registry by the digest the session recorded, then checked with
no GPU: labels carry every lock hash as pinned/ has it now, and the in-image checks pass (FlashMLA sm_90a cubins,
Marlin-MoE code an sm_90 loads, DeepGEMM's sm90 header compiled for sm_90a by the lock's nvcc, `nvcc --version`
= the lock, `import vllm, torch, compressed_tensors`; for calibration torch, llmcompressor and CUDA 13.0)."""

from __future__ import annotations

import json

import pytest

from mtpquant import images
from mtpquant.images import release
from mtpquant.images.labels import label_problems

pytestmark = pytest.mark.docker_cuda


def recorded(key: str) -> dict:
    if not release.RESULTS.is_file():
        pytest.fail(f"{release.RESULTS} not found: run `nox -s images-cuda` first")
    return json.loads(release.RESULTS.read_text())[key]


@pytest.mark.parametrize("image", ["calibrate", "serve"])
def test_cuda_image_pulled_by_digest_passes_its_checks(image):
    r = recorded(f"{image}-cuda")
    repo, digest = r["digest_ref"].split("@")
    pulled = images.client().images.pull(repo, tag=digest)
    assert pulled.id == r["image_id"]
    assert label_problems(pulled.attrs["Config"]["Labels"], image, "cuda") == []
    result = release.in_image_checks(r["digest_ref"], image)
    failed = {name: c["detail"] for name, c in result["checks"].items() if not c["ok"]}
    assert result["exit"] == 0 and not failed, failed
    if image == "serve":
        assert result["checks"]["nvcc"]["detail"]["version"] == "13.0.88"
        assert "sm_90a" in result["checks"]["flashmla _flashmla_C.abi3.so"]["detail"]["archs"]
