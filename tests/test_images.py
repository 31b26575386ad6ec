"""Image inputs without an engine: the dry run prints every pin, content tags follow content, the build context
is deterministic, kernel pins are enforced, and `--runtime docker` mounts what the stage reads and writes."""

import io
import tarfile
import tomllib
from pathlib import Path

import pytest

from mtpquant import images
from mtpquant.core.checkpoint import file_sha256
from mtpquant.core.errors import MtpquantError
from mtpquant.pins import kernels, runtime

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "pinned"


@pytest.mark.parametrize("image,flavour", [(i, f) for i in images.FLAVOURS for f in images.FLAVOURS[i] if f != "cpu"])
def test_cuda_dry_run_prints_every_pinned_input(image, flavour, capsys):
    assert images.main(["plan", "--image", image, "--flavour", flavour]) == 0
    out = capsys.readouterr().out
    lock = tomllib.loads((PINNED / "images.lock").read_text())
    fl = images.FLAVOURS[image][flavour]
    assert lock["base"][fl.base]["ref"] in out
    assert file_sha256(PINNED / f"{fl.lock}.txt") in out
    assert f"snapshot {images.UBUNTU_SNAPSHOT}" in out
    assert "torch==2.13.0" in out
    if fl.kernels:
        klock = tomllib.loads((PINNED / "kernels.lock").read_text())
        assert lock["base"][fl.build_base]["ref"] in out
        assert klock["vllm"]["sdist_sha256"] in out and "TORCH_CUDA_ARCH_LIST=9.0a" in out
        assert f"CUDA {klock['toolchain']['cuda']}" in out
        for src in klock["source"]:  # every kernel source, by SHA or flagged
            assert f"{src['repo']} @ {src['sha']}" in out
        assert "deepgemm [sparse attention]" in out and "flashmla [sparse attention]" in out
        for name in kernels.unresolved(klock):
            assert f"UNRESOLVED {name}" in out


def test_content_tag_follows_content(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    files = [("a.txt", tmp_path / "a.txt")]
    args = {"LOCK": "calibrate-cpu", "REVISION": "r1"}
    tag = images.content_tag(images.hashed(files), args)
    assert images.content_tag(images.hashed(files), {**args, "REVISION": "r2", "PIP_NO_INDEX": "0"}) == tag
    assert images.content_tag(images.hashed(files), {**args, "LOCK": "serve-cpu"}) != tag
    (tmp_path / "a.txt").write_text("y")
    assert images.content_tag(images.hashed(files), args) != tag


def test_context_refuses_a_file_changed_after_tagging(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    s = images.spec("calibrate", "cpu")
    s = images.BuildSpec(**{**s.__dict__, "wheelhouse": None, "files": tuple(images.hashed([("a.txt",
                                                                                            tmp_path / "a.txt")]))})
    (tmp_path / "a.txt").write_text("y")
    with pytest.raises(MtpquantError, match="changed since the image tag"):
        images.write_context(s, io.BytesIO())


def test_spec_tag_is_stable_and_base_must_be_a_digest():
    a = images.spec("calibrate", "cpu")
    assert images.spec("calibrate", "cpu").local_ref == a.local_ref
    mirror = "127.0.0.1:5000/mirror/python@sha256:" + "d" * 64
    b = images.spec("calibrate", "cpu", {"cpu": mirror})
    assert b.buildargs["BASE_IMAGE"] == mirror and b.tag != a.tag
    with pytest.raises(MtpquantError, match="not pinned by digest"):
        images.spec("calibrate", "cpu", {"cpu": "python:3.11-slim"})
    with pytest.raises(MtpquantError, match="unknown image"):
        images.spec("calibrate", "rocm")


def test_context_tar_is_deterministic_and_complete(tmp_path):
    s = images.spec("calibrate", "cpu")
    s = images.BuildSpec(**{**s.__dict__, "wheelhouse": None})
    one, two = io.BytesIO(), io.BytesIO()
    images.write_context(s, one)
    images.write_context(s, two)
    assert one.getvalue() == two.getvalue()
    with tarfile.open(fileobj=io.BytesIO(one.getvalue())) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    for must in ("containers/calibrate.Dockerfile", "pinned/calibrate-cpu.txt", "src/mtpquant/cli.py",
                 "recipes/models/tiny-glm5.yaml", "pyproject.toml", "containers/certs/README.md"):
        assert must in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert {m.mtime for m in members} == {images.SOURCE_DATE_EPOCH}


def test_kernel_build_refuses_unpinned_sources(tmp_path):
    lock = tomllib.loads((PINNED / "kernels.lock").read_text())
    text = (PINNED / "kernels.lock").read_text()
    bad = tmp_path / "kernels.lock"
    sha = lock["source"][1]["sha"]
    bad.write_text(text.replace(f'sha = "{sha}"', 'sha = "main"', 1))
    with pytest.raises(kernels.LockError, match="not a 40-hex commit"):
        kernels.load(bad)
    assert kernels.main(["build", str(bad)]) == 2


def test_kernel_fetch_commands_pin_the_commit(tmp_path):
    src = {"name": "flashmla", "repo": "https://github.com/vllm-project/FlashMLA", "sha": "ab" * 20}
    cmds = kernels.fetch_commands(src, tmp_path / "x")
    assert ["fetch", "-q", "--depth", "1", src["repo"], src["sha"]] == cmds[1][3:]
    assert src["sha"] in cmds[2]


def test_runtime_switch_and_mounts(tmp_path, monkeypatch):
    monkeypatch.delenv("MTPQUANT_RUNTIME", raising=False)
    assert runtime.split_runtime(["--run", "x", "--runtime", "docker"]) == ("docker", ["--run", "x"])
    assert runtime.split_runtime(["--runtime=local"]) == ("local", [])
    with pytest.raises(ValueError, match="--runtime"):
        runtime.split_runtime(["--runtime", "podman"])
    model = tmp_path / "models" / "glm"
    model.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    argv, mounts = runtime.mounts_for(["quantize", "--run", "runs/r1", "--model", str(model),
                                       "--calibration", "tiny-local"])
    assert argv == ["quantize", "--run", str(tmp_path / "runs" / "r1"), "--model", str(model),
                    "--calibration", "tiny-local"]
    assert mounts == sorted([str(tmp_path / "runs" / "r1"), str(model)])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hub"))
    cmd = runtime.docker_command("calibrate", ["verify", "--run", "runs/r1"], gpus=True)
    assert cmd[cmd.index("--flavour") + 1] == "cuda" and "--gpus" in cmd and "--shm-size" in cmd
    assert cmd[cmd.index("--env") + 1] == f"HF_HOME={tmp_path / 'hub'}"
    assert cmd[-5:] == ["-m", "mtpquant", "verify", "--run", str(tmp_path / "runs" / "r1")]


def test_wheelhouse_command_is_hash_checked():
    s = images.spec("calibrate", "cuda")
    cmd = images.fill_wheelhouse(s)
    assert {"--require-hashes", "--no-deps"} <= set(cmd) and "3.12" in cmd
    assert cmd[cmd.index("-r") + 1].endswith("pinned/calibrate-cuda.txt")


def test_no_engine_is_one_line(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    with pytest.raises(MtpquantError, match="no Docker engine reachable"):
        images.client()



def test_docker_save_stream_reader_gives_back_the_tar_across_chunk_boundaries():
    """reproducible.save extracts `docker save` as it streams: the reader must hand out every byte once, in
    order, whatever the SDK's chunking (2 MiB) and tarfile's read sizes."""
    import io
    import os
    import tarfile

    from mtpquant.images.reproducible import _ChunkReader

    buf = io.BytesIO()
    files = {f"layer{i}.tar": os.urandom(size) for i, size in enumerate((0, 1, 511, 2_100_000, 5_000_003))}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    size = 2 << 20  # the SDK's chunk
    chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
    assert io.BufferedReader(_ChunkReader(chunks), 1 << 20).read() == raw
    with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks), 1 << 20), mode="r|") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar}
    assert got == files
