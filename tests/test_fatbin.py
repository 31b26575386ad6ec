"""The fatbin reader on real ELF files: tiny kernels built by the lock's nvcc 13.0.88 (tests/data/fatbin/axpy.cu
says how) for sm_90a, sm_90 and sm_80 + compute_80 PTX, this interpreter (an ELF with no device code), and
broken copies; and the in-image verdicts (sm_90a present, loads on Hopper) on the same files."""

import shutil
import struct
import sys
from pathlib import Path

import pytest

from mtpquant.images import cuda_checks, fatbin

DATA = Path(__file__).parent / "data" / "fatbin"


def test_reads_the_arch_of_each_build():
    assert fatbin.archs(DATA / "sm_90a.so") == ["sm_90a"]
    assert fatbin.archs(DATA / "sm_90.so") == ["sm_90"]
    assert fatbin.archs(DATA / "sm_80ptx.so") == ["compute_80", "sm_80"]
    (entry,) = fatbin.file_entries(DATA / "sm_90a.so")
    assert (entry.kind, entry.sm, entry.arch_specific) == ("cubin", 90, True) and entry.size > 1000


def test_an_elf_without_device_code_has_no_entries():
    assert fatbin.file_entries(Path(sys.executable).resolve()) == []


def test_verdicts_on_real_objects():
    assert cuda_checks.has_sm90a(DATA / "sm_90a.so")["ok"]
    assert not cuda_checks.has_sm90a(DATA / "sm_90.so")["ok"]  # sm_90 is not the "a" variant FlashMLA needs
    hopper = cuda_checks.loads_on_hopper(DATA / "sm_80ptx.so")
    assert hopper["ok"] and hopper["detail"]["on_sm90"].startswith("PTX compute_80")
    assert cuda_checks.loads_on_hopper(DATA / "sm_90.so")["detail"]["on_sm90"] == "cubin sm_90"
    assert not cuda_checks.loads_on_hopper(Path(sys.executable).resolve())["ok"]


def _fatbin_offset(data: bytes) -> int:
    return data.index(struct.pack("<I", fatbin.FATBIN_MAGIC))


@pytest.mark.parametrize("damage,match", [
    (lambda d, o: d[:1] + b"X" + d[2:], "not an ELF"),  # ELF magic broken
    (lambda d, o: d[:4] + b"\x01" + d[5:], "not a little-endian ELF64"),  # a 32-bit ELF
    (lambda d, o: d[:o] + b"\x11\x22\x33\x44" + d[o + 4:], "not a fatbinary"),  # container magic broken
    (lambda d, o: d[:o + 8] + struct.pack("<Q", 1 << 40) + d[o + 16:], "runs past the section"),
    (lambda d, o: d[:o + 16] + b"\x07\x00" + d[o + 18:], "entry of kind 7"),  # unknown entry kind
    (lambda d, o: d[:0x28] + struct.pack("<Q", len(d)) + d[0x30:], "section header table out of bounds"),
])
def test_broken_files_are_one_line_naming_the_file(tmp_path, damage, match):
    data = (DATA / "sm_90a.so").read_bytes()
    bad = tmp_path / "bad.so"
    bad.write_bytes(damage(data, _fatbin_offset(data)))
    with pytest.raises(fatbin.FatbinError, match=match) as e:
        fatbin.file_entries(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_runs_alone_as_the_image_runs_it(tmp_path):
    """The serving image runs fatbin.py and cuda_checks.py by path with only the stdlib."""
    import json
    import subprocess

    for name in ("fatbin.py", "cuda_checks.py"):
        shutil.copy(Path(fatbin.__file__).with_name(name), tmp_path / name)
    out = subprocess.run([sys.executable, "-I", str(tmp_path / "fatbin.py"), str(DATA / "sm_90a.so")],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)[str(DATA / "sm_90a.so")][0]["arch"] == "sm_90a"
    bad = subprocess.run([sys.executable, "-I", str(tmp_path / "fatbin.py"), str(DATA / "axpy.cu")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "not an ELF" in bad.stderr
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "cuda_checks.py"), "calibrate"],
                          capture_output=True, text=True, env={"MTPQUANT_HOME": str(tmp_path / "none")})
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["ok"] is False  # no project here: a failed check
