"""StreamWriter on a GPU: the layer shard and activations it streams from device tensors (two staging buffers,
copies on a side stream, hashing on its own thread) are byte for byte what safetensors writes from host copies.
The CPU half of this is tests/test_stream.py; this is the half CI cannot run. One JSON line; exit 1 on a
mismatch. `python benchmarks/stream_writer_check.py [OUT_DIR]`"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtpquant.calib.stream.writer import StreamWriter, save_shard


def main() -> int:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    ts = {}
    for e in range(12):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            k = f"model.layers.1.mlp.experts.{e}.{proj}"
            ts[k + ".weight_packed"] = torch.randint(-2**31, 2**31 - 1, (512, 96), dtype=torch.int32, device=dev,
                                                     generator=g)
            ts[k + ".weight_scale"] = torch.randn(512, 6, device=dev, generator=g).to(torch.bfloat16)
            ts[k + ".weight_zero_point"] = torch.randint(0, 15, (64, 6), dtype=torch.int32, device=dev, generator=g)
            ts[k + ".weight_shape"] = torch.tensor([512, 768], dtype=torch.int64, device=dev)
    ts["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.randn(12, device=dev, generator=g)
    big = torch.randn(3, 1000, 6144, device=dev, generator=g).to(torch.bfloat16)  # 36.9 MB: several chunks
    ts["hidden"] = big
    out = {"device": dev, "cases": []}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_file({k: v.cpu() for k, v in ts.items()}, str(d / "ref"), metadata={"format": "pt"})
        ref = (d / "ref").read_bytes()
        for chunk in (1 << 20, 16 << 20, 64 << 20):
            w = StreamWriter(chunk=chunk, pin=dev == "cuda")
            t = time.perf_counter()
            sha = save_shard(d / "s", ts, w)
            s = time.perf_counter() - t
            w.close()
            ok = (d / "s").read_bytes() == ref and sha == hashlib.sha256(ref).hexdigest()
            out["cases"].append({"chunk": chunk, "ok": ok, "bytes": len(ref), "seconds": round(s, 3)})
    out["ok"] = all(c["ok"] for c in out["cases"])
    line = json.dumps(out)
    print(line)
    if len(sys.argv) > 1:
        Path(sys.argv[1], "stream_writer_check.json").write_text(line + "\n")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
