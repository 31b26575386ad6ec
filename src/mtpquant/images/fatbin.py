"""Which GPU code a shared object carries: its `.nv_fatbin` section's fatbinary entries, read from the ELF.

A CUDA shared object keeps its device code in `.nv_fatbin`: containers (magic 0xBA55ED50, u16 version, u16 header
size, u64 size of the entries) of entries, each with a header of u16 kind (1 PTX, 2 cubin ELF), u16 version, u32
header size, u64 payload size, the SM number at offset 28 and a flags word at offset 40. Measured here with nvcc
13.0.88 (tests/data/fatbin/): the same kernel for sm_90 and sm_90a gives cubins with the same e_flags (they differ
in the embedded ptxas options, "-arch sm_90a", and one byte of a note) and entries that differ in bit 0x100000 of
that flags word: the arch-specific ("a") variant, which the wgmma/TMA kernels of FlashMLA and DeepGEMM need.
Payloads may be compressed (vLLM's are, zstd); the headers never are, so nothing is decompressed. NVIDIA does
not document this layout: anything that does not parse is an error naming the file.

Stdlib only: the serving image runs it alone (`python fatbin.py SO...`).
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KIND = {1: "ptx", 2: "cubin"}
ARCH_SPECIFIC = 0x100000  # the "a" of sm_90a, in an entry's flags (offset 40); measured, see the docstring
_SECTION = ".nv_fatbin"


class FatbinError(ValueError):
    """A file that is not an ELF, or whose .nv_fatbin does not parse: the message names the file."""


@dataclass(frozen=True)
class Entry:
    kind: str  # "ptx" or "cubin"
    sm: int  # 90 for sm_90 / sm_90a
    arch_specific: bool  # sm_90a rather than sm_90
    size: int  # payload bytes (as stored)

    @property
    def arch(self) -> str:
        prefix = "sm" if self.kind == "cubin" else "compute"
        return f"{prefix}_{self.sm}{'a' if self.arch_specific else ''}"


def elf_section(data: bytes, name: str, where: str) -> bytes | None:
    """The bytes of a named section of a little-endian ELF64 file, or None when it has none."""
    if data[:4] != b"\x7fELF":
        raise FatbinError(f"{where}: not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise FatbinError(f"{where}: not a little-endian ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize != 64 or shoff + shnum * 64 > len(data) or shstrndx >= shnum:
        raise FatbinError(f"{where}: section header table out of bounds")
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * 64) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for sh_name, sh_type, _, _, offset, size, *_ in headers:
        end = data.find(b"\0", strtab + sh_name)
        if data[strtab + sh_name:end] == name.encode():
            if sh_type == 8:  # SHT_NOBITS: no bytes in the file
                return b""
            if offset + size > len(data):
                raise FatbinError(f"{where}: section {name} runs past the end of the file")
            return data[offset:offset + size]
    return None


def entries(data: bytes, where: str = "<bytes>") -> list[Entry]:
    """Every fatbinary entry in the file's .nv_fatbin ([] when it has no such section)."""
    section = elf_section(data, _SECTION, where)
    out: list[Entry] = []
    pos = 0
    while section and pos + 16 <= len(section):
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:
            if not any(section[pos:pos + 8]):  # padding between containers
                pos += 8
                continue
            raise FatbinError(f"{where}: {_SECTION} at +{pos:#x}: magic {magic:#x}, not a fatbinary")
        start, end = pos + header_size, pos + header_size + fat_size
        if end > len(section):
            raise FatbinError(f"{where}: {_SECTION} at +{pos:#x}: fatbinary of {fat_size} bytes runs past the section")
        e = start
        while e < end:
            if e + 48 > end:
                raise FatbinError(f"{where}: {_SECTION} at +{e:#x}: truncated entry header")
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", section, e)
            sm, = struct.unpack_from("<I", section, e + 28)
            flags, = struct.unpack_from("<Q", section, e + 40)
            if kind not in KIND or entry_header < 48 or e + entry_header + payload > end:
                raise FatbinError(f"{where}: {_SECTION} at +{e:#x}: entry of kind {kind}, header {entry_header}, "
                                  f"payload {payload} does not parse")
            out.append(Entry(KIND[kind], sm, bool(flags & ARCH_SPECIFIC), payload))
            e += entry_header + payload
        pos = end
    return out


def file_entries(path: Path) -> list[Entry]:
    return entries(Path(path).read_bytes(), str(path))


def archs(path: Path) -> list[str]:
    """The distinct architectures of a file's device code, sorted: ['compute_80', 'sm_90a', ...]."""
    return sorted({e.arch for e in file_entries(path)})


def main(argv: list[str] | None = None) -> int:
    """`python fatbin.py SO...`: one JSON object {path: [entries]} (exit 2 and one line on a bad file)."""
    try:
        print(json.dumps({p: [asdict(e) | {"arch": e.arch} for e in file_entries(Path(p))]
                          for p in (argv if argv is not None else sys.argv[1:])}))
    except (OSError, FatbinError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
