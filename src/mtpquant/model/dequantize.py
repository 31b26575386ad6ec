"""BF16 copies of quantized weights, for platforms without an INT4 MoE kernel (this CPU), and the RTN baseline.

`dequantize_artifact`: every packed Linear of a checkpoint whose `quantization_config` is a known scheme
(mtpquant.model.schemes) becomes the BF16 tensor with the same values, through the scheme's dequantizer
(compressed-tensors' own per-module decompressor; transformers' `run_compressed=False` path fails on asymmetric
per-expert weights). One shard in, one shard out: memory is bounded by a shard. Every other tensor (the MTP
layer included) is copied as is; `quantization_config` is dropped from config.json and recorded in
`dequantized.json` with the source's hashes.

`rtn_checkpoint`: the round-to-nearest baseline: the base's routed experts quantized with a scheme
(`PackedIntScheme.rtn`: min/max scales from compressed-tensors' `calculate_qparams`) and dequantized
back, no calibration. It is what GPTQ must beat.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_dir
from mtpquant.core.checkpoint import INDEX_NAME, Checkpoint, file_sha256, read_json
from mtpquant.core.errors import MtpquantError
from mtpquant.core.run import MANIFEST
from mtpquant.model.families import family_for
from mtpquant.model.schemes import DEFAULT, PACKED, PackedIntScheme, scheme_for_config

RECORD = "dequantized.json"


def _copy_side_files(src: Path, dst: Path) -> None:
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (INDEX_NAME, "config.json",
                                                                                   MANIFEST, RECORD):
            shutil.copy2(p, dst / p.name)


def _source_hashes(ck: Checkpoint) -> dict[str, str]:
    files = [ck.root / "config.json", *ck.shard_files()]
    if ck.index_path.exists():
        files.append(ck.index_path)
    return {p.name: file_sha256(p) for p in files}


def is_current(out: Path, source: Path) -> bool:
    """True when `out` was made from exactly these source files."""
    rec = Path(out) / RECORD
    if not rec.is_file():
        return False
    return read_json(rec).get("source_sha256") == _source_hashes(Checkpoint(source))


def _rewrite(ck: Checkpoint, out: Path, transform: Any, config: dict[str, Any], record: dict[str, Any]) -> Path:
    """Write every shard of `ck` through `transform(shard_tensors) -> tensors`, plus index/config/record."""
    from safetensors.torch import load_file, save_file

    with atomic_dir(Path(out)) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for shard in sorted(set(ck.weight_map.values())):
            tensors = transform(load_file(str(ck.root / shard)))
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_side_files(ck.root, tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)


def dequantize_artifact(artifact: Path, out: Path) -> Path:
    import torch

    ck = Checkpoint(artifact)
    qc = ck.config.get("quantization_config")
    where = str(ck.root / "config.json")
    if not qc:
        raise MtpquantError(f"{where}: no quantization_config: nothing to dequantize")
    scheme = scheme_for_config(qc, where)
    parts = (*scheme.LAYOUT_PARTS, *scheme.EXTRA_PARTS)
    count = 0

    def transform(tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal count
        out_t = {k: v for k, v in tensors.items() if not k.endswith(tuple("." + p for p in parts))}
        for name in sorted(k for k in tensors if k.endswith(f".{PACKED}")):
            mod = name.removesuffix(f".{PACKED}")
            local = {p: tensors[f"{mod}.{p}"] for p in parts if f"{mod}.{p}" in tensors}
            missing = [p for p in scheme.parts() if p not in local]
            if missing:
                raise MtpquantError(f"{artifact}: {mod} has {PACKED} but no {'/'.join(missing)} in the same shard")
            out_t[f"{mod}.weight"] = scheme.dequantize(local).to(torch.bfloat16).contiguous()
            count += 1
        return out_t

    config = {k: v for k, v in ck.config.items() if k != "quantization_config"}
    record = {"source": str(ck.root.resolve()), "source_sha256": _source_hashes(ck), "quantization_config": qc,
              "note": f"BF16 copy with the artifact's exact dequantized INT{scheme.num_bits} weight values; every "
                      "other tensor (MTP layer included) copied unchanged"}
    path = _rewrite(ck, out, transform, config, record)
    rec = read_json(path / RECORD)
    if count == 0:
        shutil.rmtree(path, ignore_errors=True)
        raise MtpquantError(f"{artifact}: quantization_config is set but no tensor is packed")
    rec["dequantized_modules"] = count
    (path / RECORD).write_text(json.dumps(rec, indent=2) + "\n")
    return path


def rtn_checkpoint(base: Path, out: Path, scheme: PackedIntScheme = DEFAULT) -> Path:
    ck = Checkpoint(base)
    fam = family_for(ck.config, str(ck.root / "config.json"))
    experts = {f"{m}.weight" for m in fam.routed_expert_linears(ck.config)}
    seen = 0

    def transform(tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal seen
        for name in [k for k in tensors if k in experts]:
            tensors[name] = scheme.rtn(tensors[name])
            seen += 1
        return tensors

    record = {"source": str(ck.root.resolve()), "source_sha256": _source_hashes(ck),
              "rtn": {"num_bits": scheme.num_bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric,
                      "targets": "routed experts (MTP layer excluded)"}}
    path = _rewrite(ck, out, transform, dict(ck.config), record)
    if seen != len(experts):
        shutil.rmtree(path, ignore_errors=True)
        raise MtpquantError(f"{base}: RTN touched {seen} expert weights, expected {len(experts)}")
    return path
