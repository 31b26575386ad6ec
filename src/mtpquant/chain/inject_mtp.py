"""`inject-mtp`: put the MTP layer(s) back into a quantized checkpoint, in BF16, byte for byte.

`from_pretrained` never instantiates the MTP layer, so llm-compressor never saves it. This stage copies
every MTP tensor (under the family's MTP prefixes: `model.layers.{L}.*` with L >= num_hidden_layers, or
`mtp.*`) from the base checkpoint into new shard files, streaming in fixed-size chunks (memory stays flat
whatever the layer's size: GLM-5's is ~19 GB), then rewrites the index and adds the MTP layers to
`quantization_config.ignore` so vLLM's drafter loads them unquantized. The output is built in a temp dir
(quantized shards hard-linked, not copied) and renamed into place, so rerunning is idempotent and a crash
leaves the previous state.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_dir, atomic_write_json
from mtpquant.core.checkpoint import INDEX_NAME, Checkpoint, TensorInfo, write_shard_from
from mtpquant.core.errors import MtpquantError
from mtpquant.core.measure import peak_memory
from mtpquant.core.progress import byte_progress
from mtpquant.model.families import Family, family_for

MTP_SHARD = re.compile(r"^mtp-\d{5}-of-\d{5}\.safetensors$")
DEFAULT_SHARD_BYTES = 5 << 30


def check_compatible(base: Checkpoint, target: Checkpoint, fam: Family) -> None:
    b_arch, t_arch = base.architecture(), target.architecture()
    if b_arch != t_arch:
        raise MtpquantError(f"{target.root}: architecture {t_arch} does not match the base's {b_arch}")
    for key in fam.match_keys():
        if base.config.get(key) != target.config.get(key):
            raise MtpquantError(f"{target.root / 'config.json'}: {key}={target.config.get(key)!r} does not match "
                                f"the base's {base.config.get(key)!r}")


def mtp_tensors(base: Checkpoint, fam: Family) -> list[TensorInfo]:
    cfg = base.config
    if fam.num_mtp(cfg) < 1:
        raise MtpquantError(f"{base.root / 'config.json'}: {fam.mtp_key} is missing or 0: no MTP layer")
    prefixes = tuple(fam.mtp_prefixes(cfg))
    found = [base.tensors[n] for n in sorted(base.tensors) if n.startswith(prefixes)]
    for prefix in prefixes:
        have = {t.name.removeprefix(prefix) for t in found if t.name.startswith(prefix)}
        if not have:
            raise MtpquantError(f"{base.root}: no MTP tensors under {prefix}* (is this the BF16 base checkpoint?)")
        missing = [x for x in fam.mtp_extra if x not in have]
        if missing:
            raise MtpquantError(f"{base.root}: MTP tensor {prefix}{missing[0]} is missing")
    return found


def plan_shards(tensors: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def inject_mtp(base_dir: Path, quantized_dir: Path, out_dir: Path,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    t0 = time.perf_counter()
    base, target = Checkpoint(base_dir), Checkpoint(quantized_dir)
    fam = family_for(base.config, str(base.root / "config.json"))
    check_compatible(base, target, fam)
    mtp = mtp_tensors(base, fam)
    prefixes = tuple(fam.mtp_prefixes(base.config))
    if "quantization_config" not in target.config:
        raise MtpquantError(f"{target.root / 'config.json'}: no quantization_config: not a quantized checkpoint")

    # Drop any MTP entries from an earlier injection: they are rewritten from the base (idempotent).
    kept = {n: s for n, s in target.weight_map.items() if not n.startswith(prefixes)}
    kept_shards = set(kept.values())
    if any(MTP_SHARD.match(s) for s in kept_shards):
        raise MtpquantError(f"{target.root}: an mtp-* shard holds non-MTP tensors; refusing to overwrite it")
    shards = plan_shards(mtp, max_shard_bytes)
    copied = 0
    with atomic_dir(Path(out_dir)) as tmp, byte_progress("inject-mtp", sum(t.nbytes for t in mtp)) as advance:
        for f in sorted(target.root.iterdir()):
            if f.is_dir() or f.name in (INDEX_NAME, "config.json") or MTP_SHARD.match(f.name):
                continue
            if f.suffix == ".safetensors" and f.name not in kept_shards:
                continue  # an unindexed shard: not part of the checkpoint
            (_link_or_copy if f.suffix == ".safetensors" else shutil.copy2)(f, tmp / f.name)
        weight_map = dict(kept)
        for i, group in enumerate(shards):
            name = f"mtp-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            copied += write_shard_from(group, tmp / name, metadata={"format": "pt"}, on_bytes=advance)
            weight_map.update(dict.fromkeys((t.name for t in group), name))
        sizes = {n: i.nbytes for n, i in target.tensors.items() if n in kept}
        index = {"metadata": {"total_size": sum(sizes.values()) + copied},
                 "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_json(tmp / INDEX_NAME, index)
        config = dict(target.config)
        qc = dict(config["quantization_config"])
        ignore = list(qc.get("ignore") or [])
        qc["ignore"] = ignore + [p for p in fam.mtp_ignore(base.config) if p not in ignore]
        config["quantization_config"] = qc
        config = fam.with_mtp(config, fam.num_mtp(base.config))
        atomic_write_json(tmp / "config.json", config)
    seconds = time.perf_counter() - t0
    return {
        "stage": "inject-mtp", "base": str(base.root), "quantized": str(target.root), "output": str(out_dir),
        "mtp_layers": fam.mtp_layers(base.config), "tensors": len(mtp), "bytes": copied,
        "shards": len(shards), "seconds": round(seconds, 3),
        "throughput_mb_s": round(copied / 2**20 / seconds, 1) if seconds else None,
        "memory": peak_memory(),
    }
