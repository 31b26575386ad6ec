"""Hostile and corrupt files: every stage that reads a checkpoint answers with one line naming the file (and the
tensor or key), exit 2 for a bad input and 3 for a bad artifact under `verify`; never a traceback. Killed stages'
temp dirs are removed by the next run, never a live process's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from mtpquant import cli
from mtpquant.core.atomic import atomic_dir, remove_stale
from mtpquant.core.checkpoint import read_safetensors_header
from mtpquant.core.errors import MtpquantError


def first_shard(ckpt) -> str:
    return sorted(set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]


def with_header(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def header_of(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def rewrite(path, change) -> None:
    header, data = header_of(path)
    change(header)
    with_header(path, json.dumps(header).encode(), data)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _overlap(h: dict) -> None:
    a, b = [k for k in h if k != "__metadata__"][:2]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (h[b]["data_offsets"][1]
                                                                                 - h[b]["data_offsets"][0])]


# name -> (how to corrupt the first shard, what the one-line error must say)
SHARD_CORRUPTIONS = {
    "random bytes": (lambda p: p.write_bytes(os.urandom(4096)), "not a safetensors file"),
    "header length 2^62": (lambda p: p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}"), "header length"),
    "header is a JSON list": (lambda p: with_header(p, b"[1, 2, 3]"), "a JSON object expected"),
    "header not JSON": (lambda p: with_header(p, b"\xff\xfe{{{"), "corrupt safetensors header"),
    "entry not an object": (lambda p: rewrite(p, lambda h: h.__setitem__(first_tensor(h), 7)), "not an object"),
    "unknown dtype": (lambda p: rewrite(p, lambda h: h[first_tensor(h)].__setitem__("dtype", "Q9")), "unknown dtype"),
    "shape of strings": (lambda p: rewrite(p, lambda h: h[first_tensor(h)].__setitem__("shape", ["a"])),
                         "not a list of non-negative integers"),
    "offsets reversed": (lambda p: rewrite(p, lambda h: h[first_tensor(h)]["data_offsets"].reverse()),
                         "data_offsets"),
    "shape disagrees with offsets": (lambda p: rewrite(p, lambda h: h[first_tensor(h)]["shape"].append(3)),
                                     "data_offsets give"),
    "offsets past the end": (lambda p: rewrite(p, lambda h: h[first_tensor(h)].__setitem__(
        "data_offsets", [0, 1 << 40])), "past the end of the file"),
    "overlapping tensors": (lambda p: rewrite(p, _overlap), "overlap"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-64]), "truncated"),
    "metadata not strings": (lambda p: rewrite(p, lambda h: h.__setitem__("__metadata__", {"a": 1})),
                             "__metadata__"),
}


def _index_dup(ck) -> None:
    raw = (ck / "model.safetensors.index.json").read_text()
    index = json.loads(raw)
    name, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in set(index["weight_map"].values()) if s != shard)
    # the wrong shard first, the right one last: a plain json.loads keeps the last and sees nothing wrong
    body = json.dumps(index["weight_map"])[1:-1]
    text = '{"metadata": {}, "weight_map": {' + f'"{name}": "{other}", ' + body + "}}"
    (ck / "model.safetensors.index.json").write_text(text)


CHECKPOINT_CORRUPTIONS = {
    "index lists a tensor twice": (_index_dup, "appears twice"),
    "weight_map is a list": (lambda ck: (ck / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
                             "'weight_map' must map"),
    "index names a path outside": (lambda ck: (ck / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "../../etc/passwd"}}'), "is not a .safetensors file beside it"),
    "config.json is a list": (lambda ck: (ck / "config.json").write_text("[]"), "a JSON object expected"),
    "config.json not UTF-8": (lambda ck: (ck / "config.json").write_bytes(b"\xff\xfe\x00"), "config.json"),
}


def corrupt(ckpt, kind: str):
    if kind in SHARD_CORRUPTIONS:
        SHARD_CORRUPTIONS[kind][0](ckpt / first_shard(ckpt))
        return SHARD_CORRUPTIONS[kind][1]
    CHECKPOINT_CORRUPTIONS[kind][0](ckpt)
    return CHECKPOINT_CORRUPTIONS[kind][1]


ALL = [*SHARD_CORRUPTIONS, *CHECKPOINT_CORRUPTIONS]


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])  # a traceback would propagate here and fail the test
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("kind", ALL)
def test_corrupt_base_is_one_line_for_every_stage(built, tmp_path, capsys, kind):
    base = tmp_path / "base"
    shutil.copytree(built["glm4_moe"]["base"], base)
    expected = corrupt(base, kind)
    stages = [["quantize", "--run", tmp_path / "q", "--model", base],
              ["inject-mtp", "--run", tmp_path / "i", "--base", base, "--quantized", built["glm4_moe"]["quantized"]],
              ["verify", "--run", tmp_path / "v", "--base", base, "--artifact", built["glm4_moe"]["artifact"]]]
    for argv in stages:
        code, err = run_cli(capsys, *argv)
        assert code == 2, (argv[0], err)
        line = one_line(err)
        assert expected in line and "Traceback" not in err, (argv[0], line)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and base not in p.parents] == []  # nothing written


@pytest.mark.parametrize("kind", [k for k in ALL if not k.startswith("config")])
def test_corrupt_artifact_fails_verify_with_exit_3_and_a_record(built, tmp_path, capsys, kind):
    art = tmp_path / "artifact"
    shutil.copytree(built["glm4_moe"]["artifact"], art)
    expected = corrupt(art, kind)
    code, err = run_cli(capsys, "verify", "--run", tmp_path, "--base", built["glm4_moe"]["base"], "--artifact", art)
    assert code == 3 and "Traceback" not in err
    record = json.loads((tmp_path / "verify.json").read_text())
    assert record["ok"] is False
    assert any(expected in f for c in record["checks"] for f in c["failures"]), record


def test_reader_accepts_every_shard_the_fixtures_wrote(built):
    for paths in built.values():
        for shard in sorted(paths["artifact"].glob("*.safetensors")):
            assert read_safetensors_header(shard)


def test_reader_bounds_the_header_without_reading_it(tmp_path):
    """2^62 would be an OverflowError or MemoryError if it were ever passed to read()."""
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", (1 << 64) - 1) + b"{}")
    with pytest.raises(MtpquantError, match="x.safetensors: not a safetensors file"):
        read_safetensors_header(p)


# ---------------------------------------------------------------- killed stages' leftovers

KILLED_INSIDE = """
import os, signal, sys
from pathlib import Path
from mtpquant.core.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "half-written.safetensors").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_stage_removes_what_a_killed_one_left_and_says_so(tmp_path, capsys):
    final = tmp_path / "quantized"
    proc = subprocess.run([sys.executable, "-c", KILLED_INSIDE, str(final)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".quantized.tmp-")]
    assert len(left) == 1 and (left[0] / "half-written.safetensors").exists() and not final.exists()
    with atomic_dir(final) as tmp:
        (tmp / "done").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized"]
    assert f"removed {left[0]}: left by process" in capsys.readouterr().err


def test_a_running_process_keeps_its_temp_dir(tmp_path):
    final = tmp_path / "artifact"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from mtpquant.core.atomic import HOST

        mine = tmp_path / f".artifact.tmp-{HOST}-{live.pid}-abcd1234"
        mine.mkdir()
        other_host = tmp_path / ".artifact.tmp-elsewhere-1-abcd1234"
        other_host.mkdir()
        assert remove_stale(final) == []
        assert mine.is_dir() and other_host.is_dir()
    finally:
        live.kill()
        live.wait()
    assert remove_stale(final) == [mine]
    assert other_host.is_dir()  # another host's process cannot be asked: never removed from here


def test_chat_calibration_without_a_chat_template_fails_before_the_model_loads(built, tmp_path, capsys,
                                                                                monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(built["glm4_moe"]["base"], base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((base / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tc))
    from mtpquant.calib import ranks

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the calibration set was checked")

    monkeypatch.setattr(ranks, "load_model", no_load)
    code, err = run_cli(capsys, "quantize", "--run", tmp_path, "--model", base, "--calibration", "tiny-local")
    assert code == 2
    line = one_line(err)
    assert "tiny-local.yaml: sources[1].messages_field needs a chat template" in line
