"""`mtpquant check DIR`: an artifact re-hashed against its manifest.json names every missing, extra and changed
file and exits 3; an intact one passes."""

import shutil

import pytest

from mtpquant import cli
from mtpquant.chain.manifest import write_manifest
from mtpquant.core.run import Run


@pytest.fixture
def with_manifest(built, tmp_path):
    art = tmp_path / "artifact"
    shutil.copytree(built["glm4_moe"]["artifact"], art)
    write_manifest(art, Run(tmp_path))
    return art


def check(capsys, art) -> tuple[int, str]:
    code = cli.main(["check", str(art)])
    return code, capsys.readouterr().err


def test_intact_artifact_passes(with_manifest, capsys):
    code, err = check(capsys, with_manifest)
    assert code == 0 and "intact" in err


def flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_every_difference_is_named(with_manifest, capsys):
    art = with_manifest
    shard = sorted(art.glob("*.safetensors"))[0]
    flip_last_byte(shard)                       # same size, other bytes: only the hash can tell
    (art / "tokenizer_config.json").unlink()    # missing
    (art / "stray.bin").write_bytes(b"x")       # extra
    code, err = check(capsys, art)
    assert code == 3 and "Traceback" not in err
    assert f"{shard.name} differs from the manifest" in err
    assert "tokenizer_config.json is missing" in err and "stray.bin is not in the manifest" in err


def test_bad_manifest_is_one_line(with_manifest, capsys):
    (with_manifest / "manifest.json").write_text('{"files": [1]}')
    code, err = check(capsys, with_manifest)
    assert code == 2 and "'files' must map" in err and len(err.strip().splitlines()) == 1


def test_serve_checks_the_manifest_first(with_manifest, capsys):
    """A changed file stops `serve --check-manifest` before any vLLM starts (none is installed in this venv)."""
    flip_last_byte(sorted(with_manifest.glob("*.safetensors"))[0])
    code = cli.main(["serve", "--run", str(with_manifest.parent), "--artifact", str(with_manifest),
                     "--check-manifest", "--check"])
    err = capsys.readouterr().err
    assert code == 3 and "differs from the manifest" in err
