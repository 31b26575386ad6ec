"""Hyperparameter sweep for the tiny arithmetic model (run on a GPU to choose the CPU training recipe).

For each configuration: train (mtpquant.tiny.train_tiny.fit), then on 400 held-out problems the greedy accuracy
in BF16 and with the routed experts round-to-nearest INT4 (group 128, asymmetric, min/max), and the MTP
layer's top-1 agreement with the target. Not part of the product: a record of how TrainConfig was chosen.
Usage: python benchmarks/tiny_sweep.py OUT.json '[{"lr": 3e-3}, ...]'
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path


def rtn_(w, bits=4, group=128):
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zp = (-lo / scale).round().clamp(0, qmax)
    q = ((g / scale).round() + zp).clamp(0, qmax)
    return ((q - zp) * scale).reshape(n, k).to(w.dtype)


def one(args):
    _idx, kw, device = args
    import copy

    import torch

    from mtpquant.tiny.tiny_task import problems
    from mtpquant.tiny.train_tiny import TrainConfig, accuracy, fit, mtp_agreement, tokenizer

    cfg = TrainConfig(**kw)
    tok = tokenizer(Path(tempfile.mkdtemp()))
    t0 = time.time()
    def on_step(step, lm, mtp_loss):
        if step % 500 == 0:
            print(f"cfg {_idx} step {step} lm {lm:.3f} mtp {mtp_loss:.3f} {time.time() - t0:.0f}s", flush=True)

    model, mtp, log = fit(cfg, tok, device, on_step)
    secs = time.time() - t0
    rows = problems(1, 400, cfg.min_steps, cfg.max_steps, cfg.operand_max)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    res = {"config": kw, "train_s": round(secs, 1), "final": log[-1], "acc_fp32": accuracy(model, tok, rows),
           "acc_bf16": accuracy(bf16, tok, rows), "mtp_agree": mtp_agreement(model, mtp, tok, rows[:200])}
    with torch.no_grad():
        for name, p in bf16.named_parameters():
            if ".mlp.experts." in name and p.ndim == 3:
                for e in range(p.shape[0]):
                    p[e] = rtn_(p[e])
        res["acc_rtn4"] = accuracy(bf16, tok, rows)
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    out, configs = sys.argv[1], json.loads(sys.argv[2])
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(len(configs), 8)) as pool:
        results = pool.map(one, [(i, c, device) for i, c in enumerate(configs)])
    Path(out).write_text(json.dumps(results, indent=2))
