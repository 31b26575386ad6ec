"""Load + linearize under torchrun, the phase that kept run C from measuring 4 GPUs: per rank, seconds to load
through compressed-tensors' shared CPU offload (`mtpquant.calib.ranks.load_model`) and to linearize the experts,
with llm-compressor's `linearize_moe` on every rank or with `mtpquant.calib.ranks.linearize` (only the source rank
copies). Runs on CPUs (gloo) too.

    python benchmarks/dist_load.py --experts 16 --nproc 2 --out results/dist_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(ckpt: Path, mode: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    import transformers

    from mtpquant.calib import ranks

    rank = ranks.init()
    t0 = time.perf_counter()
    model = ranks.load_model(transformers.GlmMoeDsaForCausalLM, ckpt, torch.bfloat16)
    ranks.barrier()
    t1 = time.perf_counter()
    if mode == "mtpquant":
        ranks.linearize(model)
    else:
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
    ranks.barrier()
    t2 = time.perf_counter()
    # every rank sees the source rank's values: a checksum of one expert's weights
    w = model.model.layers[1].mlp.experts[3].down_proj.weight
    rows = ranks.gather({"rank": rank, "load_s": t1 - t0, "linearize_s": t2 - t1,
                         "checksum": float(w.detach().float().sum()), "rss_gb": _rss_gb()})
    if rank == 0:
        out.write_text(json.dumps(rows))
    if dist.is_initialized():
        dist.destroy_process_group()


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--modes", default="llm_compressor,mtpquant")
    ap.add_argument("--work", default="/tmp/dist-load")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dist_load.json"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help="cProfile each rank into WORK/profile-MODE-RANK.txt")
    args = ap.parse_args()
    if args.child:
        if not args.profile:
            return child(Path(args.child[0]), args.child[1], Path(args.child[2]))
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.runcall(child, Path(args.child[0]), args.child[1], Path(args.child[2]))
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
        rank = os.environ.get("RANK", "0")
        (Path(args.child[2]).parent / f"profile-{args.child[1]}-{rank}.txt").write_text(buf.getvalue())
        return None
    from mtpquant.tiny.shaped_fixture import glm5_config, write_shaped_checkpoint

    work = Path(args.work)
    ckpt = work / f"glm5-shaped-e{args.experts}"
    if not (ckpt / "config.json").exists():
        write_shaped_checkpoint(glm5_config(num_experts=args.experts), ckpt)
    result = {"experts": args.experts, "nproc": args.nproc, "modes": {}}
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    for mode in args.modes.split(","):
        js = work / f"rows-{mode}.json"
        js.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(ckpt), mode, str(js),
               *(["--profile"] if args.profile else [])]
        if args.nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   *cmd[1:]]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env)
        wall = time.perf_counter() - t
        rows = json.loads(js.read_text()) if js.exists() else None
        result["modes"][mode] = {"exit": proc.returncode, "wall_s": wall, "ranks": rows}
        if rows:
            print(f"{mode}: wall {wall:.1f}s " + " ".join(
                f"[rank {r['rank']}: load {r['load_s']:.1f}s linearize {r['linearize_s']:.1f}s rss {r['rss_gb']:.1f}G "
                f"sum {r['checksum']:.4g}]" for r in rows), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
