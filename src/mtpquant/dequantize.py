"""BF16 copies of quantized weights, for platforms without an INT4 MoE kernel (this CPU), and the RTN baseline.

`dequantize_artifact`: every packed INT4 Linear of a compressed-tensors `pack-quantized` checkpoint becomes
the BF16 tensor with the same values, through compressed-tensors' own per-module
`PackedQuantizationCompressor.decompress` (transformers' `run_compressed=False` path fails on asymmetric
per-expert weights). One shard in, one shard out: memory is bounded by a shard. Every other tensor (the MTP
layer included) is copied as is; `quantization_config` is dropped from config.json and recorded in
`dequantized.json` with the source's hashes.

`rtn_checkpoint`: the round-to-nearest baseline: the base's routed experts quantized with the same scheme
(INT4, group, asymmetric; min/max scales from compressed-tensors' `calculate_qparams`) and dequantized
back, no calibration. It is what GPTQ must beat.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mtpquant.atomic import atomic_dir
from mtpquant.checkpoint import INDEX_NAME, Checkpoint, file_sha256, read_json
from mtpquant.errors import MtpquantError
from mtpquant.families import family_for, matches
from mtpquant.run import MANIFEST

RECORD = "dequantized.json"
PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def _scheme(qc: dict[str, Any], module: str, where: str) -> Any:
    from compressed_tensors.quantization import QuantizationScheme

    for gname, g in (qc.get("config_groups") or {}).items():
        if any(matches(t, module) for t in g.get("targets", [])) or len(qc["config_groups"]) == 1:
            return QuantizationScheme(targets=g.get("targets", []), weights=g.get("weights"))
        del gname
    raise MtpquantError(f"{where}: no quantization_config.config_groups entry targets {module}")


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
    from compressed_tensors.compressors import PackedQuantizationCompressor

    ck = Checkpoint(artifact)
    qc = ck.config.get("quantization_config")
    where = str(ck.root / "config.json")
    if not qc:
        raise MtpquantError(f"{where}: no quantization_config: nothing to dequantize")
    if qc.get("format") != "pack-quantized":
        raise MtpquantError(f"{where}: quantization_config.format is {qc.get('format')!r}, only pack-quantized "
                            "can be dequantized here")
    count = 0

    def transform(tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal count
        out_t = {k: v for k, v in tensors.items() if not k.endswith(tuple("." + p for p in PARTS))}
        for name in sorted(k for k in tensors if k.endswith(".weight_packed")):
            mod = name.removesuffix(".weight_packed")
            local = {p: tensors[f"{mod}.{p}"] for p in PARTS if f"{mod}.{p}" in tensors}
            if "weight_shape" not in local or "weight_scale" not in local:
                raise MtpquantError(f"{artifact}: {mod} has weight_packed but no weight_shape/weight_scale "
                                    "in the same shard")
            dec = PackedQuantizationCompressor.decompress(local, _scheme(qc, mod, where))
            out_t[f"{mod}.weight"] = dec["weight"].to(torch.bfloat16).contiguous()
            count += 1
        return out_t

    config = {k: v for k, v in ck.config.items() if k != "quantization_config"}
    record = {"source": str(ck.root.resolve()), "source_sha256": _source_hashes(ck), "quantization_config": qc,
              "note": "BF16 copy with the artifact's exact dequantized INT4 weight values; every other tensor "
                      "(MTP layer included) copied unchanged"}
    path = _rewrite(ck, out, transform, config, record)
    rec = read_json(path / RECORD)
    if count == 0:
        shutil.rmtree(path, ignore_errors=True)
        raise MtpquantError(f"{artifact}: quantization_config is set but no tensor is packed")
    rec["dequantized_modules"] = count
    (path / RECORD).write_text(json.dumps(rec, indent=2) + "\n")
    return path


def rtn_weight(w: Any, num_bits: int = 4, group_size: int = 128, symmetric: bool = False) -> Any:
    """Round-to-nearest fake quantization of a [N, K] weight per group of K, min/max range."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=symmetric, strategy="group",
                            group_size=group_size)
    n, k = w.shape
    if k % group_size:
        raise MtpquantError(f"weight [{n}, {k}]: K is not a multiple of group_size {group_size}")
    x = w.to(torch.float32)
    grouped = x.reshape(n, k // group_size, group_size)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    return fake_quantize(x, scale, zp, args).to(torch.bfloat16)


def rtn_checkpoint(base: Path, out: Path, num_bits: int = 4, group_size: int = 128, symmetric: bool = False) -> Path:
    ck = Checkpoint(base)
    fam = family_for(ck.config, str(ck.root / "config.json"))
    experts = {f"{m}.weight" for m in fam.routed_expert_linears(ck.config)}
    seen = 0

    def transform(tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal seen
        for name in [k for k in tensors if k in experts]:
            tensors[name] = rtn_weight(tensors[name], num_bits, group_size, symmetric)
            seen += 1
        return tensors

    record = {"source": str(ck.root.resolve()), "source_sha256": _source_hashes(ck),
              "rtn": {"num_bits": num_bits, "group_size": group_size, "symmetric": symmetric,
                      "targets": "routed experts (MTP layer excluded)"}}
    path = _rewrite(ck, out, transform, dict(ck.config), record)
    if seen != len(experts):
        shutil.rmtree(path, ignore_errors=True)
        raise MtpquantError(f"{base}: RTN touched {seen} expert weights, expected {len(experts)}")
    return path
