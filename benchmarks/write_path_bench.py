"""Where the stream engine's per-layer write (and read) time goes, old path against new, on this machine.

The H200 run (benchmarks/STREAM_H200.md) measured `write` at 17-23 s per layer (77-81 s for 4 layers) and
called it pack+write. It is not the pack: pack_layer runs compressed-tensors' compression on the layer where it
sits (the GPU there) and is counted in `compute`. `write` is the writer thread's work: the layer's shard
(safetensors save_file, fsync, sha256 re-read) and the activations at the layer boundary (host copy,
torch.save, fsync, sha256 re-read), and the activations are ~6 GB per layer at 768 x 512 tokens while the
shard of a 32-expert MoE layer is ~0.8 GB. This benchmark builds one layer's worth of both at GLM-5.2's real
dimensions (hidden 6144, moe_intermediate 2048, packed INT4 experts as compressed-tensors' pack_to_int32 makes
them, the layer's BF16 attention tensors from mtpquant.tiny.shaped_fixture's specs) and times every phase of:

  old  the engine before this change (stream-2): save_file + fsync + sha256 re-read for the shard;
       torch.save + fsync + sha256 re-read for the activations (the host copy `_to(cpu)` is a no-op on a CPU)
  new  stream-3: the same save_file for the shard (the artifact's bytes are unchanged); the activations
       streamed by calib.stream.StreamWriter (hashed while written) + fsync

and, for the read side, `read_tensors` + `fuse_experts` + `.to(dtype)` (old) against `ReadBuffers.read` +
`layer_state` (new) on a written shaped checkpoint layer. All runs in one process (the engine's imports take
minutes per process on a loaded 2-core machine; peak RSS is the process's so far); runs interleave old, new, old,
new, ...; the table gives medians with [min-max] and n.

    python benchmarks/write_path_bench.py --out benchmarks/results/write_path_cpu.json [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def layer_outputs(experts: int, samples: int, seq: int) -> tuple[
        dict[str, Any], dict[str, Any], list[Any], list[Any]]:
    """(packed shard tensors of one GLM-5.2 MoE layer with `experts` experts, hidden per batch, topk per batch)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from mtpquant.tiny.shaped_fixture import glm5_config, tensor_specs

    g = torch.Generator().manual_seed(0)
    cfg = glm5_config(num_experts=experts, num_layers=2, dense_layers=1)
    h, inter = int(cfg.hidden_size), int(cfg.moe_intermediate_size)

    def fill(shape: tuple[int, ...], dtype: Any) -> Any:  # cheap deterministic contents: I/O does not look at them
        t = torch.empty(shape, dtype=dtype)
        t.view(-1)[:].copy_(torch.arange(t.numel(), dtype=torch.int32).remainder_(251).to(dtype)) if t.numel() \
            <= (1 << 22) else t.fill_(1)
        return t

    shard: dict[str, Any] = {}
    for name, shape, dtype in tensor_specs(cfg):  # the layer's unquantized tensors at their real shapes
        if name.startswith("model.layers.1.") and ".mlp.experts." not in name:
            shard[name] = fill(shape, torch.float32 if dtype == "fp32" else torch.bfloat16)
    pack_s, packed = 0.0, {}
    for proj, (n, k) in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
        q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)  # one expert's Linears really packed
        zp = torch.randint(-8, 8, (n, k // 128), generator=g, dtype=torch.int8)
        t = time.perf_counter()
        packed[proj] = (pack_to_int32(q, 4), pack_to_int32(zp, 4, packed_dim=0).contiguous())
        pack_s += time.perf_counter() - t
        packed[proj] += (torch.rand((n, k // 128), generator=g).to(torch.bfloat16),)
    for e in range(experts):  # every expert: copies of those (the bytes' values do not matter to the write)
        for proj, (n, k) in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            p = f"model.layers.1.mlp.experts.{e}.{proj}."
            w, zp, sc = packed[proj]
            shard[p + "weight_packed"] = w.clone()
            shard[p + "weight_scale"] = sc.clone()
            shard[p + "weight_zero_point"] = zp.clone()
            shard[p + "weight_shape"] = torch.tensor([n, k])
    hidden = [fill((1, seq, h), torch.bfloat16) for _ in range(samples)]
    topk = [fill((1, seq, min(2048, seq)), torch.int64) for _ in range(samples)]
    return {"pack_to_int32_s_one_expert": round(pack_s, 3), "linears_per_expert": 3}, shard, hidden, topk


def _fsync(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return time.perf_counter() - t


def write_child(path: str, experts: int, samples: int, seq: int, work: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from mtpquant.calib.stream.writer import StreamWriter, _acts_entries
    from mtpquant.core.checkpoint import file_sha256

    pack, shard, hidden, topk = layer_outputs(experts, samples, seq)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    out: dict[str, Any] = {"pack": pack, "shard_bytes": nbytes(shard.values()),
                           "activations_bytes": nbytes(hidden) + nbytes(topk)}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    work.mkdir(parents=True, exist_ok=True)
    sp, ap = work / "shard.safetensors", work / "acts"
    ph: dict[str, float] = {}
    t = time.perf_counter()
    save_file(shard, str(sp), metadata={"format": "pt"})
    ph["shard_save_file"] = time.perf_counter() - t
    ph["shard_fsync"] = _fsync(sp)
    t = time.perf_counter()
    shard_sha = file_sha256(sp)
    ph["shard_sha256_reread"] = time.perf_counter() - t
    if path == "old":
        t = time.perf_counter()
        torch.save({"hidden": hidden, "topk": topk}, ap)
        ph["acts_torch_save"] = time.perf_counter() - t
        ph["acts_fsync"] = _fsync(ap)
        t = time.perf_counter()
        file_sha256(ap)
        ph["acts_sha256_reread"] = time.perf_counter() - t
    else:
        w = StreamWriter()
        t = time.perf_counter()
        w.write(ap, _acts_entries(hidden, topk), {"format": "x", "batches": str(len(hidden))})
        ph["acts_stream_write_and_hash"] = time.perf_counter() - t
        ph["acts_fsync"] = _fsync(ap)
    # attribution: sha256 alone and plain write alone on the same activation bytes (page cache, no fsync)
    data = [t.reshape(-1).view(torch.uint8).numpy() for t in hidden + topk]
    t = time.perf_counter()
    h = hashlib.sha256()
    for d in data:
        h.update(memoryview(d))
    ph["acts_sha256_only"] = time.perf_counter() - t
    out["acts_file_bytes"] = ap.stat().st_size
    ph["write_total_shard"] = ph["shard_save_file"] + ph["shard_fsync"] + ph["shard_sha256_reread"]
    ph["write_total_acts"] = sum(v for k, v in ph.items() if k.startswith("acts_") and k != "acts_sha256_only")
    ph["write_total"] = ph["write_total_shard"] + ph["write_total_acts"]
    out["phases_s"] = {k: round(v, 3) for k, v in ph.items()}
    out["shard_sha256"] = shard_sha
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    out["rss_before_write_gib"] = round(rss0 / 2**20, 3)
    sp.unlink()
    ap.unlink()
    return out


def read_child(path: str, ckpt: Path) -> dict[str, Any]:
    import torch

    from mtpquant.calib.stream.build import fuse_experts, layer_state
    from mtpquant.calib.stream.reader import ReadBuffers, layer_names, read_tensors
    from mtpquant.core.checkpoint import Checkpoint
    from mtpquant.model.families.base import layer_prefix

    src = Checkpoint(ckpt)
    names = layer_names(src, 1)
    src.tensors  # noqa: B018 - headers parsed before the clock (both paths have them: the index, the headers)
    ph: dict[str, float] = {}
    t = time.perf_counter()
    if path == "old":
        tensors = read_tensors(src, names)
        ph["read"] = time.perf_counter() - t
        t = time.perf_counter()
        state = {k: v.to(device="cpu", dtype=torch.bfloat16) for k, v in fuse_experts(tensors, layer_prefix(1)).items()}
    else:
        buffers = ReadBuffers(src)
        tensors = buffers.read(names)
        ph["read"] = time.perf_counter() - t
        t = time.perf_counter()
        state = layer_state(tensors, layer_prefix(1), "cpu", dict.fromkeys(
            [n.removeprefix(layer_prefix(1)) for n in names if ".mlp.experts." not in n]
            + [f"mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")], torch.bfloat16))
    ph["build_state"] = time.perf_counter() - t
    nb = sum(src.tensors[n].nbytes for n in names)
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(state[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()[:4096])
    return {"phases_s": {k: round(v, 3) for k, v in ph.items()}, "layer_bytes": nb,
            "read_gb_per_s": round(nb / ph["read"] / 1e9, 3), "state_digest": digest.hexdigest(),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def spread(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/write_path_cpu.json")
    ap.add_argument("--work", default="/tmp/write-path-bench")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--read-experts", type=int, default=16, help="experts of the shaped checkpoint read (0: skip)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child:
        kind, path = args.child.split(":")
        res = write_child(path, args.experts, args.samples, args.seq_len, work / f"w-{path}") if kind == "write" \
            else read_child(path, Path(args.ckpt))
        print("RESULT " + json.dumps(res))
        return
    work.mkdir(parents=True, exist_ok=True)
    ckpt = None
    if args.read_experts:
        from mtpquant.tiny.shaped_fixture import glm5_config, write_shaped_checkpoint

        ckpt = work / f"ckpt-e{args.read_experts}"
        if not (ckpt / "config.json").exists():
            write_shaped_checkpoint(glm5_config(num_experts=args.read_experts, num_layers=2, dense_layers=1), ckpt)

    def child(spec: str) -> dict[str, Any]:
        """One run. In this process (the engine's imports, llm-compressor's, took minutes per process on this
        loaded machine): `peak_rss_gib` is the process's peak so far, not this run's."""
        kind, path = spec.split(":")
        if kind == "write":
            return write_child(path, args.experts, args.samples, args.seq_len, work / f"w-{path}")
        return read_child(path, ckpt)

    import mtpquant.calib.stream  # noqa: F401 - imported before any clock

    runs: dict[str, list[dict[str, Any]]] = {"write:old": [], "write:new": [], "read:old": [], "read:new": []}
    specs = ["write:old", "write:new"] + (["read:old", "read:new"] if ckpt else [])
    for r in range(args.repeats):
        for spec in specs:  # interleaved: old, new, old, new
            res = child(spec)
            runs[spec].append(res)
            print(f"#{r} {spec}: {json.dumps(res['phases_s'])} rss {res['peak_rss_gib']} GiB", flush=True)
    summary: dict[str, Any] = {}
    for spec, rs in runs.items():
        if not rs:
            continue
        keys = rs[0]["phases_s"].keys()
        summary[spec] = {"phases_s": {k: spread([x["phases_s"][k] for x in rs]) for k in keys},
                         "peak_rss_gib": spread([x["peak_rss_gib"] for x in rs])}
    w_old, w_new = runs["write:old"][0], runs["write:new"][0]
    checks = {"shard_sha256_equal": all(x["shard_sha256"] == w_old["shard_sha256"]
                                        for x in runs["write:old"] + runs["write:new"])}
    if ckpt:
        checks["read_state_equal"] = len({x["state_digest"] for x in runs["read:old"] + runs["read:new"]}) == 1
    acts_gb = w_old["activations_bytes"] / 1e9
    shard_gb = w_old["shard_bytes"] / 1e9
    rates = {f"{spec}_acts_gb_per_s": round(acts_gb / summary[spec]["phases_s"]["write_total_acts"]["median"], 3)
             for spec in ("write:old", "write:new")}
    rates.update({f"{spec}_shard_gb_per_s": round(shard_gb / summary[spec]["phases_s"]["write_total_shard"]["median"],
                                                  3) for spec in ("write:old", "write:new")})
    out = {"machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end", "args": vars(args),
           "sizes": {"shard_gb": round(shard_gb, 3), "activations_gb": round(acts_gb, 3),
                     "acts_file_gb_old": round(w_old["acts_file_bytes"] / 1e9, 3),
                     "acts_file_gb_new": round(w_new["acts_file_bytes"] / 1e9, 3),
                     "pack_to_int32": w_old["pack"]},
           "summary": summary, "rates": rates, "checks": checks, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nshard {shard_gb:.3f} GB, activations {acts_gb:.3f} GB; checks {checks}; rates {rates}")
    print("| phase | " + " | ".join(s for s in summary) + " |")
    print("|---|" + "---|" * len(summary))
    allkeys = list(dict.fromkeys(k for s in summary.values() for k in s["phases_s"]))
    for k in allkeys + ["peak_rss_gib"]:
        cells = []
        for s in summary.values():
            c = s["peak_rss_gib"] if k == "peak_rss_gib" else s["phases_s"].get(k)
            cells.append(f"{c['median']} [{c['min']}-{c['max']}]" if c else "")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
