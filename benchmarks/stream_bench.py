"""Issue 11's benchmark: `quantize --engine stream` against `--engine memory` on one GLM-5.2-shaped checkpoint.

One process per engine run (clean CUDA context and peak counters), each under `/usr/bin/time -v` (peak host
RSS of the whole process) with `nvidia-smi` sampled every 200 ms (peak GPU memory as the driver sees it, the
CUDA context included) beside the report's own `memory` field (torch's peak allocated). Phases:

  gen     write the checkpoint (mtpquant.tiny.shaped_fixture, GPU when there is one) and the calibration set
  floor   page cache dropped (where allowed), every source shard read once sequentially (16 MiB reads):
          the read floor; 4 GiB written and fsynced: the write floor
  reads   the engine's own reader (ReadBuffers) alone: every decoder layer read into the two reused buffers with
          --read-sweep threads each (default 1,2,4,8), interleaved A B C D D C B A, page cache dropped each time
  memory  `mtpquant.calib.quantize.quantize` (the in-memory engine), per-subgraph spans through calib_speed's
          PipelineTimer (llm-compressor's own pipeline functions)
  stream  `mtpquant.calib.stream.quantize_stream` (--restart), the report's seconds.per_layer; once per
          --stream-read-threads value (default: the engine's), interleaved; with --nproc N under torchrun
          (--split layers|experts), every rank's reads, I/O and host RSS from the report's per_rank
  kill    the stream engine SIGKILLed while layer 2 runs (its journal lists layers 0 and 1, then
          --kill-delay seconds), then the same call again (resume); every output file's sha256 compared
          with the uninterrupted stream run's (this run's, or --ref-json's)

With --repeats N the engine runs interleave (memory, stream, memory, stream, ...). Page cache is dropped
before every run. Outputs are hashed (file sha256 and per-tensor sha256) and deleted to keep the disk.
The calibration set is the committed tiny-local texts (data/calibration/tiny-code.jsonl and the rendered
tiny-instruct dialogues) concatenated in seeded random order into --samples samples of --seq-len tokens
(the fixture's byte-level tokenizer: one token per byte), so it runs offline at the production token count.

    python benchmarks/stream_bench.py --out OUT [--small] [--phases gen,floor,memory,stream,kill]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RECIPE = "w4a16-asym-g128"
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


# ---- inputs -------------------------------------------------------------------------------------------


def config_for(args: argparse.Namespace) -> Any:
    from mtpquant.tiny.shaped_fixture import SMALL_DIMS, glm5_config

    return glm5_config(num_experts=args.experts, num_layers=1 + args.moe_layers, dense_layers=1,
                       **(SMALL_DIMS if args.small else {}))


def ckpt_dir(args: argparse.Namespace) -> Path:
    return Path(args.work) / f"glm5-shaped-1d{args.moe_layers}m-e{args.experts}{'-small' if args.small else ''}"


def expected_bytes(config: Any) -> tuple[int, dict[int, int]]:
    """(total bytes, bytes per decoder layer) the shaped checkpoint will have, from the meta model's specs."""
    from mtpquant.tiny.shaped_fixture import tensor_specs

    total, per_layer = 0, {}
    for name, shape, dtype in tensor_specs(config):
        n = (4 if dtype == "fp32" else 2)
        for d in shape:
            n *= d
        total += n
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + n
    return total, per_layer


def disk_need(args: argparse.Namespace, config: Any, total: int, ckpt: Path) -> int:
    """Peak bytes a run still needs on the work disk: the checkpoint (unless written already), one quantized
    output (routed experts at ~0.26 of their BF16 bytes: INT4 plus a BF16 scale and packed zero point per 128),
    the stream engine's two activation files at a layer boundary (hidden states plus ~35% for the indexer's top-k
    indices and pickling), a margin."""
    from mtpquant.tiny.shaped_fixture import tensor_specs

    experts = 0
    for name, shape, _ in tensor_specs(config):
        if ".mlp.experts." in name:
            n = 2
            for d in shape:
                n *= d
            experts += n
    out = total - experts + int(0.26 * experts)
    acts = int(1.35 * args.samples * args.seq_len * int(config.hidden_size) * 2)
    have = total if (ckpt / "config.json").exists() else 0
    return total - have + out + 2 * acts + int(args.disk_margin_gb * 1e9)


def write_calibration(args: argparse.Namespace) -> Path:
    """A calibration recipe over the committed tiny-local texts, --samples x --seq-len byte tokens."""
    work = Path(args.work)
    texts = [json.loads(x)["text"] for x in (ROOT / "data/calibration/tiny-code.jsonl").read_text().splitlines()
             if x.strip()]
    for x in (ROOT / "data/calibration/tiny-instruct.jsonl").read_text().splitlines():
        if x.strip():
            msgs = json.loads(x)["messages"]
            texts.append("".join(f"<|{m['role']}|>\n{m['content']}" for m in msgs))
    rng = random.Random(0)
    data = work / f"calib-tinylocal-{args.samples}x{args.seq_len}.jsonl"
    with open(data, "w") as fh:
        for _ in range(args.samples):
            s = ""
            while len(s.encode()) < args.seq_len + 16:  # a little over: truncation makes every sample full length
                s += rng.choice(texts) + "\n"
            fh.write(json.dumps({"text": s}) + "\n")
    calib = work / f"calib-tinylocal-{args.samples}x{args.seq_len}.yaml"
    calib.write_text(json.dumps({
        "name": calib.stem, "description": "tiny-local texts concatenated to full length (stream_bench.py)",
        "num_samples": args.samples, "max_seq_length": args.seq_len, "seed": 0,
        "sources": [{"local": str(data), "text_field": "text", "weight": 1}]}))
    return calib


# ---- I/O floor ----------------------------------------------------------------------------------------


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def read_floor(ckpt: Path) -> dict[str, Any]:
    dropped = drop_caches()
    buf = bytearray(16 << 20)
    total = 0
    t = time.perf_counter()
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    s = time.perf_counter() - t
    return {"page_cache_dropped": dropped, "bytes": total, "seconds": round(s, 2), "gb_per_s": round(total / s / 1e9, 3)}  # noqa: E501


def write_floor(work: Path, nbytes: int) -> dict[str, Any]:
    chunk = os.urandom(16 << 20)
    path = work / "write-floor.bin"
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(nbytes // len(chunk)):
            fh.write(chunk)
        os.fsync(fh.fileno())
    s = time.perf_counter() - t
    path.unlink()
    return {"bytes": nbytes, "seconds": round(s, 2), "gb_per_s": round(nbytes / s / 1e9, 3), "fsync": True}


def read_sweep(ckpt: Path, threads: list[int], rounds: int) -> dict[str, Any]:
    """ReadBuffers alone (the engine's reader, pinned where CUDA is): every decoder layer in order into its two
    reused buffers (allocated and pinned before the clock starts), per thread count, interleaved A B C D D C B A,
    page cache dropped before each pass."""
    import torch

    from mtpquant.calib.stream.reader import ReadBuffers, layer_names
    from mtpquant.core.checkpoint import Checkpoint

    source = Checkpoint(ckpt)
    layers = [layer_names(source, i) for i in range(int(source.config["num_hidden_layers"]))]
    sizes = [sum(source.tensors[n].nbytes for n in names) for names in layers]
    readers = {t: ReadBuffers(source, pin=torch.cuda.is_available(), threads=t) for t in threads}
    for r in readers.values():  # both buffers at the largest layer's size (+ alignment), before any timing
        for k in range(2):
            r._buffer(k, max(sizes) + 64 * max(len(n) for n in layers))
    passes = []
    for k in range(rounds):
        for t in (threads if k % 2 == 0 else threads[::-1]):
            dropped = drop_caches()
            a = time.perf_counter()
            for names in layers:
                readers[t].read(names)
            s = time.perf_counter() - a
            passes.append({"threads": t, "seconds": round(s, 3), "gb_per_s": round(sum(sizes) / s / 1e9, 3),
                           "page_cache_dropped": dropped})
            log(f"reads: {t} thread(s) {passes[-1]['gb_per_s']} GB/s")
    for r in readers.values():
        r.close()
    summary = {str(t): spread([p["gb_per_s"] for p in passes if p["threads"] == t]) for t in threads}
    return {"bytes": sum(sizes), "layers": len(layers), "pinned": torch.cuda.is_available(), "passes": passes,
            "summary": summary}


# ---- hashes -------------------------------------------------------------------------------------------


def _hash_file(path: Path) -> tuple[str, str, dict[str, Any]]:
    """(name, file sha256, per-tensor {name: [dtype, shape, sha256]} for safetensors files)."""
    tensors: dict[str, Any] = {}
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return path.name, hashlib.sha256().hexdigest(), {}
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            view = memoryview(mm)
            file_sha = hashlib.sha256(view).hexdigest()
            if path.suffix == ".safetensors":
                (hlen,) = struct.unpack("<Q", mm[:8])
                header = json.loads(mm[8:8 + hlen])
                base = 8 + hlen
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    a, b = info["data_offsets"]
                    tensors[name] = [info["dtype"], info["shape"], hashlib.sha256(view[base + a:base + b]).hexdigest()]
            view.release()
        finally:
            mm.close()
    return path.name, file_sha, tensors


def hash_dir(d: Path) -> dict[str, Any]:
    files = sorted(p for p in d.iterdir() if p.is_file())
    with cf.ThreadPoolExecutor(8) as ex:
        res = list(ex.map(_hash_file, files))
    return {"files": {n: s for n, s, _ in res}, "tensors": {k: v for _, _, t in res for k, v in t.items()},
            "bytes": sum(p.stat().st_size for p in files)}


def layer_bytes_on_disk(ckpt: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    for f in ckpt.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(hlen))
        for name, info in header.items():
            m = re.match(r"model\.layers\.(\d+)\.", name)
            if m:
                a, b = info["data_offsets"]
                out[int(m.group(1))] = out.get(int(m.group(1)), 0) + b - a
    return out


# ---- one engine run, in a child process ---------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import torch
    from calib_speed import PipelineTimer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with PipelineTimer() as timer:
        if args.child == "memory":
            from mtpquant.calib.quantize import quantize

            rep = quantize(Path(args.ckpt), RECIPE, args.calib, Path(args.dest))
        else:
            from mtpquant.calib.stream.engine import quantize_stream

            rep = quantize_stream(Path(args.ckpt), RECIPE, args.calib, Path(args.dest), restart=args.restart,
                                  split=args.split, read_threads=args.read_threads)
    if rep.get("rank", 0) != 0:  # torchrun: rank 0 reports every rank
        return
    rep["process_s_after_imports"] = round(time.perf_counter() - t, 2)
    rep["pipeline_spans"] = [(label, round(a - t, 3), round(b - a, 3)) for label, a, b in timer.spans]
    rep["torch_gpu_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else 0.0
    Path(args.json).write_text(json.dumps(rep))


class GpuSampler:
    """Max of nvidia-smi's memory.used (MiB) while a run lasts; None without nvidia-smi."""

    def __init__(self) -> None:
        self.max_mib: float | None = None
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                v = float(line.strip().split(",")[0])
            except ValueError:
                continue
            self.max_mib = v if self.max_mib is None else max(self.max_mib, v)

    def stop(self) -> float | None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
        return round(self.max_mib / 1024, 3) if self.max_mib is not None else None


def run_engine(args: argparse.Namespace, engine: str, ckpt: Path, calib: Path, dest: Path, tag: str,
               restart: bool = True, kill_at_layer: int | None = None,
               env: dict[str, str] | None = None, read_threads: int | None = None) -> dict[str, Any]:
    work = Path(args.work)
    js = work / f"child-{tag}.json"
    js.unlink(missing_ok=True)
    err = work / f"child-{tag}.log"
    timef = work / f"time-{tag}.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--ckpt", str(ckpt), "--calib",
           str(calib), "--dest", str(dest), "--json", str(js), "--work", str(work)]
    if restart:
        cmd.append("--restart")
    if read_threads is not None:
        cmd += ["--read-threads", str(read_threads)]
    if engine == "stream" and args.nproc > 1:  # --standalone: a free rendezvous port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               *cmd[1:], "--split", args.split]
    if Path("/usr/bin/time").exists() and kill_at_layer is None:
        cmd = ["/usr/bin/time", "-v", "-o", str(timef), *cmd]
    res: dict[str, Any] = {"engine": engine, "tag": tag, "page_cache_dropped": drop_caches(),
                           "read_threads": read_threads, "nproc": args.nproc if engine == "stream" else 1}
    gpu = GpuSampler()
    t = time.perf_counter()
    with open(err, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        if kill_at_layer is not None:
            res["kill"] = wait_and_kill(proc, dest, kill_at_layer, args.kill_delay)
        rc = proc.wait()
    res["wall_s"] = round(time.perf_counter() - t, 2)
    res["nvidia_smi_peak_gb"] = gpu.stop()
    res["rc"] = rc
    if timef.exists():
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timef.read_text())
        if m:
            res["time_v_peak_rss_gib"] = round(int(m.group(1)) / 2**20, 3)
    tail = err.read_text(errors="replace").splitlines()
    res["log_tail"] = [x[:300] for x in tail if "it/s]" not in x][-25:] if rc != 0 or kill_at_layer is not None \
        else []
    if js.exists():
        rep = json.loads(js.read_text())
        res["report"] = rep
    return res


def wait_and_kill(proc: subprocess.Popen, dest: Path, layer: int, delay: float) -> dict[str, Any]:
    """SIGKILL the run's process group once its journal lists `layer` finished layers (0..layer-1) and
    `delay` more seconds have passed (layer `layer` is then being read or calibrated)."""
    from mtpquant.calib.stream.journal import JOURNAL, work_dir_for

    jpath = work_dir_for(dest) / JOURNAL
    while proc.poll() is None:
        try:
            if len(json.loads(jpath.read_text())["layers"]) >= layer:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    else:
        return {"killed": False, "why": f"exited {proc.returncode} before layer {layer}"}
    time.sleep(delay)
    finished = len(json.loads(jpath.read_text())["layers"])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    files = {p.name: p.stat().st_size for p in work_dir_for(dest).iterdir()}
    return {"killed": True, "signal": "SIGKILL", "layers_finished_at_kill": finished,
            "delay_after_layer_done_s": delay, "work_dir_files": files}


def gpu_peak_at(per_layer: list[dict[str, Any]]) -> str | None:
    """'layer L, after PHASE (X GiB)': the first compute phase whose peak-so-far is the run's peak (engine
    stream-4's gpu_peak_gib_after_* per layer, in phase order); None without them (a CPU run, older engines)."""
    prefix = "gpu_peak_gib_after_"
    seen = [(x["layer"], k[len(prefix):], v) for x in per_layer for k, v in x.items() if k.startswith(prefix)]
    if not seen:
        return None
    top = max(v for _, _, v in seen)
    layer, phase, v = next(t for t in seen if t[2] == top)
    return f"layer {layer}, after {phase} ({v:g} GiB)"


def summarize_run(r: dict[str, Any]) -> dict[str, Any]:
    rep = r.get("report") or {}
    s = rep.get("seconds", {})
    row = {"wall_s": r["wall_s"], "rc": r["rc"], "total_s": s.get("total"), "load_s": s.get("load"),
           "calibrate_and_solve_s": s.get("calibrate_and_solve"), "save_s": s.get("save"),
           "peak_rss_gib_time_v": r.get("time_v_peak_rss_gib"),
           "peak_rss_gib_report": (rep.get("memory") or {}).get("host_peak_rss_gb"),
           "gpu_peak_allocated_gib": (rep.get("memory") or {}).get("gpu_peak_allocated_gb"),
           "gpu_peak_reserved_gib": rep.get("torch_gpu_peak_reserved_gb"),
           "gpu_peak_nvidia_smi_gib": r.get("nvidia_smi_peak_gb"),
           "gptq_loss_median": rep.get("gptq_loss_median"), "activations_on": rep.get("activations_on")}
    if rep.get("engine") == "stream":
        pl = s.get("per_layer", [])
        row["per_layer"] = pl
        row["deterministic"] = rep.get("deterministic")
        row["load_phases"] = s.get("load_phases")  # where the time before layer 0's compute went
        row["tail_phases"] = s.get("tail_phases")  # and the time after the last layer's compute
        row["release_phases"] = s.get("release_phases")  # the release threads' steps (unpin, unlinks)
        row["gpu_peak_at"] = gpu_peak_at(pl)  # the layer and compute phase where the GPU's peak was reached
        # engine stream-1 before the overlap: calibrate_and_solve / pack_and_write; since: compute / write
        here = [x for x in pl if not x.get("resumed")]
        row["gpu_work_s"] = round(sum(x.get("compute", x.get("calibrate_and_solve", 0.0)) for x in here), 2)
        row["read_s"] = round(sum(x["read"] for x in here), 2)
        row["pack_and_write_s"] = round(sum(x.get("write", x.get("pack_and_write", 0.0)) for x in here), 2)
        # stream-3: the write split into the shard and the activations file, their bytes (write GB/s)
        for k in ("write_shard", "write_activations", "shard_bytes", "activations_bytes"):
            if any(k in x for x in here):
                row[f"{k}_{'s' if k.startswith('write') else 'sum'}"] = round(sum(x.get(k, 0) for x in here), 3)
        if row.get("write_shard_s"):
            row["shard_write_gb_per_s"] = round(row["shard_bytes_sum"] / row["write_shard_s"] / 1e9, 3)
        if row.get("write_activations_s"):
            row["activations_write_gb_per_s"] = round(
                row["activations_bytes_sum"] / row["write_activations_s"] / 1e9, 3)
        row["exposed_write_last_layer_s"] = here[-1].get("waited_for_write") if here else None
        row["read_buffers"] = rep.get("read_buffers")
        row["io_hidden_s"] = s.get("io_hidden")
        row["ranks"], row["split"] = rep.get("ranks"), rep.get("split")
        row["per_rank"] = [{k: x.get(k) for k in ("rank", "io", "solved_linears", "host_rss_gib", "memory")}
                           for x in rep.get("per_rank", [])]
    else:
        row["per_layer"] = memory_per_layer(rep.get("pipeline_spans", []))
        row["gpu_work_s"] = s.get("calibrate_and_solve")
    return row


def memory_per_layer(spans: list[Any]) -> list[dict[str, float]]:
    """Per subgraph of the sequential pipeline: its calibration and propagation passes and its solve."""
    per: dict[int, dict[str, float]] = {}
    solves = [d for label, _, d in spans if label == "solve"]
    for label, _, d in spans:
        m = re.match(r"(\d+)/(\d+)\s+(\w+)", label)
        if m:
            k = int(m.group(1)) - 1
            per.setdefault(k, {"calibrate": 0.0, "propagate": 0.0})
            per[k]["calibrate" if m.group(3).lower().startswith("calib") else "propagate"] += round(d, 3)
    out = []
    for k in sorted(per):
        row = {"subgraph": k, **per[k]}
        if k < len(solves):
            row["solve"] = round(solves[k], 3)
        out.append(row)
    return out


def spread(xs: list[float]) -> dict[str, float] | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2), "n": len(xs)}


def compare_tensors(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    common = sorted(set(a) & set(b))
    diff = [n for n in common if a[n] != b[n]]
    return {"common": len(common), "identical": len(common) - len(diff), "differ": len(diff),
            "differ_first": diff[:5], "only_first": sorted(set(a) - set(b))[:5], "only_second": sorted(set(b) - set(a))[:5],  # noqa: E501
            "n_only_first": len(set(a) - set(b)), "n_only_second": len(set(b) - set(a))}


def first_divergence(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Two stream runs' per-layer hashes (seconds.per_layer): the first layer whose shard, and the first whose
    output activations, differ (None: all equal). A shard that differs while its input activations were
    equal points at the solve; activations that differ first point at the propagation pass."""
    def first(key: str) -> int | None:
        for x, y in zip(a, b, strict=False):
            if x.get(key) != y.get(key):
                return x.get("layer")
        return None

    return {"layers_compared": min(len(a), len(b)), "first_shard_differs": first("shard_sha256"),
            "first_activations_differ": first("activations_sha256")}


def determinism(res: dict[str, Any]) -> dict[str, Any] | None:
    """Uninterrupted stream runs on this machine against the first one: equal files, and where they part."""
    st = [r for r in res["runs"] if r["engine"] == "stream" and r["rc"] == 0 and "output" in r]
    if len(st) < 2:
        return None
    ref = st[0]
    out = {"deterministic_settings": ref["summary"].get("deterministic"), "runs": []}
    for r in st[1:]:
        files = {f for f in set(ref["output"]["files"]) | set(r["output"]["files"])
                 if ref["output"]["files"].get(f) != r["output"]["files"].get(f)}
        out["runs"].append({"tag": r["tag"], "files_equal": not files, "files_differing": sorted(files),
                            **first_divergence(ref["summary"]["per_layer"], r["summary"]["per_layer"])})
    out["run_to_run_identical"] = all(x["files_equal"] for x in out["runs"])
    return out


def loss_ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    la = {r["module"]: r["loss"] for r in a.get("per_linear", []) if r.get("loss")}
    lb = {r["module"]: r["loss"] for r in b.get("per_linear", []) if r.get("loss")}
    common = [m for m in la if m in lb]
    if not common:
        return None
    ratios = [lb[m] / la[m] for m in common]
    return {"linears": len(common), "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "identical": sum(la[m] == lb[m] for m in common)}


# ---- the parent ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/stream-bench-out"))
    ap.add_argument("--work", default="/tmp/stream-bench")
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--small", action="store_true", help="fixture dimensions (the same code on a CPU)")
    ap.add_argument("--experts", type=int, default=0, help="0: 128, else 96, 64, 32, the first that fits the disk")
    ap.add_argument("--moe-layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--phases", default="gen,floor,memory,stream,kill")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kill-layer", type=int, default=2)
    ap.add_argument("--kill-delay", type=float, default=3.0)
    ap.add_argument("--write-floor-gib", type=float, default=4.0)
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip a phase that would not end inside this")
    ap.add_argument("--disk-margin-gb", type=float, default=3.0)
    ap.add_argument("--ref-json", help="an earlier result JSON: the stream hashes the kill phase compares with")
    ap.add_argument("--read-sweep", default="1,2,4,8", help="reads phase: the thread counts, comma-separated")
    ap.add_argument("--read-rounds", type=int, default=2, help="reads phase: rounds of the sweep (A B .. B A ..)")
    ap.add_argument("--stream-read-threads", default="",
                    help="stream phase: one run per value per repeat, interleaved (default: the engine's default)")
    ap.add_argument("--nproc", type=int, default=1, help="stream runs under torchrun with this many ranks")
    ap.add_argument("--split", default="layers", choices=["layers", "experts"], help="with --nproc: the split")
    ap.add_argument("--read-threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--restart", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if 0 < args.experts < 8:
        ap.error("--experts: GLM-5.2 routes each token to 8 experts; give at least 8")
    if "kill" in args.phases.split(",") and args.moe_layers < args.kill_layer + 1:
        ap.error("--moe-layers: the kill phase needs a layer after --kill-layer")
    if args.nproc > 1 and ("share" in args.phases.split(",") or "memory" in args.phases.split(",")):
        ap.error("--nproc: runs the stream engine's phases (stream, kill) under torchrun; drop memory and share")

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    resf = out / f"stream_{args.tag}.json"
    res: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "ckpt", "calib", "dest",
                                                                                     "json", "restart",
                                                                                     "read_threads")},
                           "recipe": RECIPE, "skipped": [], "runs": []}

    def save() -> None:
        resf.write_text(json.dumps(res, indent=1))

    def left() -> float:
        return args.budget_s - (time.monotonic() - T0)

    import torch

    res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    free = shutil.disk_usage(work).free
    choices = [args.experts] if args.experts else [128, 96, 64, 32]
    for e in choices:  # --experts 0: the most experts whose run fits the disk
        args.experts = e
        config = config_for(args)
        total, per_layer = expected_bytes(config)
        need = disk_need(args, config, total, ckpt_dir(args))
        if need <= free or e == choices[-1]:
            break
    res["args"]["experts"] = args.experts
    res["disk"] = {"work": str(work), "free_gb_at_start": round(free / 1e9, 2), "checkpoint_gb": round(total / 1e9, 2),
                   "peak_need_gb_estimate": round(need / 1e9, 2), "experts_tried": choices}
    if need > free:
        res["error"] = (f"disk: {free / 1e9:.1f} GB free at {work}, a run at {args.experts} experts needs about "
                        f"{need / 1e9:.1f} (checkpoint + one quantized output + two activation files)")
        save()
        sys.exit(res["error"])
    ckpt = ckpt_dir(args)
    log(f"device {res['device']}; checkpoint {total / 1e9:.1f} GB ({ckpt}); free disk {free / 1e9:.1f} GB")

    if "gen" in phases or not (ckpt / "config.json").exists():
        if not (ckpt / "config.json").exists():
            from mtpquant.tiny.shaped_fixture import write_shaped_checkpoint

            t = time.perf_counter()
            write_shaped_checkpoint(config, ckpt)
            os.sync()
            s = time.perf_counter() - t
            res["gen"] = {"seconds": round(s, 1), "bytes": total, "gb_per_s_incl_generation": round(total / s / 1e9, 3)}
            log(f"checkpoint written in {s:.1f} s")
        else:
            res["gen"] = {"reused": True}
    calib = write_calibration(args)
    res["calibration"] = {"recipe": str(calib), "samples": args.samples, "seq_len": args.seq_len,
                          "tokens": args.samples * args.seq_len, "data": "tiny-local texts concatenated"}
    lb = layer_bytes_on_disk(ckpt)
    res["layer_bytes"] = {str(k): v for k, v in sorted(lb.items())}
    res["activation_bytes_formula"] = args.samples * args.seq_len * int(config.hidden_size) * 2
    save()

    if "floor" in phases:
        res["read_floor"] = read_floor(ckpt)
        res["write_floor"] = write_floor(work, int(args.write_floor_gib * 2**30))
        log(f"read floor {res['read_floor']}; write floor {res['write_floor']}")
        save()

    if "reads" in phases:
        res["reads"] = read_sweep(ckpt, [int(x) for x in args.read_sweep.split(",")], args.read_rounds)
        log(f"reads: {json.dumps(res['reads']['summary'])}")
        save()

    # a run's seconds before the first one is timed: 30 s + 5 s per GB of checkpoint (H200: 96 experts, 31.5 GB,
    # stream 93-103 s, memory 149 s; 32 experts, 9.3 GB, stream 60-65 s)
    first = 120.0 if args.small else 30.0 + 5.0 * total / 1e9
    est: dict[str, float] = {"memory": first, "stream": first, "share": first}
    hashes: dict[str, Any] = {}
    # share: the stream engine doing one rank's GPU work of `--split experts` (MTPQUANT_STREAM_TIMED_SHARE=SHARE,
    # default 0/8: rank 0 of 8, which owns the most down_proj batches at 256 experts); its output is not valid
    variants = [int(x) for x in args.stream_read_threads.split(",") if x] or [None]
    order = [(e, t) for _ in range(args.repeats) for e in ("memory", "stream", "share") if e in phases
             for t in (variants if e == "stream" else [None])]
    for n, (engine, threads) in enumerate(order):
        if left() < est[engine] * 1.1:
            res["skipped"].append(f"{engine} #{n}: {left():.0f} s left, estimate {est[engine]:.0f} s")
            log(res["skipped"][-1])
            continue
        dest = work / f"out-{engine}-{n}"
        shutil.rmtree(dest, ignore_errors=True)
        log(f"run {engine} #{n}")
        share = {"MTPQUANT_STREAM_TIMED_SHARE": os.environ.get("SHARE", "0/8")} if engine == "share" else None
        r = run_engine(args, "stream" if engine == "share" else engine, ckpt, calib, dest, f"{engine}-{n}", env=share,
                       read_threads=threads)
        r["engine"] = engine
        est[engine] = r["wall_s"]
        if dest.exists():
            h = hash_dir(dest)
            hashes.setdefault(engine, h)
            r["output"] = {"bytes": h["bytes"], "files": h["files"]}
            r["output_tensor_hashes_match_first_run"] = h["tensors"] == hashes[engine]["tensors"]
            shutil.rmtree(dest)
        rep = r.get("report") or {}
        r["summary"] = summarize_run(r)
        r.pop("report", None)
        r["per_linear_losses"] = {x["module"]: x["loss"] for x in rep.get("per_linear", [])}
        res["runs"].append(r)
        log(f"{engine} #{n}: rc {r['rc']}, wall {r['wall_s']} s, {json.dumps({k: v for k, v in r['summary'].items() if k != 'per_layer'})}")  # noqa: E501
        save()

    if "memory" in hashes and "stream" in hashes:
        res["memory_vs_stream_tensors"] = compare_tensors(hashes["memory"]["tensors"], hashes["stream"]["tensors"])
    mem_runs = [r for r in res["runs"] if r["engine"] == "memory" and r["rc"] == 0]
    st_runs = [r for r in res["runs"] if r["engine"] == "stream" and r["rc"] == 0]
    if mem_runs and st_runs:
        res["loss_ratio_stream_over_memory"] = loss_ratio(
            {"per_linear": [{"module": k, "loss": v} for k, v in mem_runs[0]["per_linear_losses"].items()]},
            {"per_linear": [{"module": k, "loss": v} for k, v in st_runs[0]["per_linear_losses"].items()]})
    det = determinism(res)
    if det:
        res["determinism"] = det
        log(f"run to run: {json.dumps(det)}")
    save()

    if "kill" in phases:
        need = est["stream"] * 1.3
        if left() < need:
            res["skipped"].append(f"kill: {left():.0f} s left, estimate {need:.0f} s")
            log(res["skipped"][-1])
        else:
            dest = work / "out-kill"
            shutil.rmtree(dest, ignore_errors=True)
            log(f"kill run: SIGKILL {args.kill_delay} s after layer {args.kill_layer - 1} is journaled")
            k1 = run_engine(args, "stream", ckpt, calib, dest, "kill", restart=True, kill_at_layer=args.kill_layer)
            log(f"killed: {json.dumps(k1.get('kill'))}")
            k2 = run_engine(args, "stream", ckpt, calib, dest, "resume", restart=False)
            kill = {"killed_run": {"wall_s": k1["wall_s"], "rc": k1["rc"], "kill": k1.get("kill"),
                                   "log_tail": k1["log_tail"]}}
            rep = k2.get("report") or {}
            kill["resume"] = {**summarize_run(k2), "resumed_after_layers": rep.get("resumed_after_layers"),
                              "log_tail": k2["log_tail"]}
            ref = hashes.get("stream")
            if ref is None and args.ref_json and Path(args.ref_json).exists():
                old = json.loads(Path(args.ref_json).read_text())
                ref = {"files": next((r["output"]["files"] for r in old["runs"]
                                      if r["engine"] == "stream" and "output" in r), None)}
                kill["reference"] = args.ref_json
            if dest.exists():
                h = hash_dir(dest)
                kill["output_files"] = h["files"]
                if ref and ref.get("files"):
                    same = {f: h["files"].get(f) == s for f, s in ref["files"].items()}
                    kill["hashes_equal_uninterrupted"] = all(same.values()) and set(h["files"]) == set(ref["files"])
                    kill["files_differing"] = sorted(f for f, ok in same.items() if not ok) + \
                        sorted(set(h["files"]) - set(ref["files"]))
                first_st = next((r for r in res["runs"] if r["engine"] == "stream" and r["rc"] == 0), None)
                if first_st:  # resumed per_layer lists every layer (the killed process's with their hashes)
                    kill["vs_first_stream_run"] = first_divergence(first_st["summary"]["per_layer"],
                                                                   kill["resume"].get("per_layer", []))
                shutil.rmtree(dest)
            res["kill"] = kill
            log(f"resume: rc {k2['rc']}, wall {k2['wall_s']} s, after layers {rep.get('resumed_after_layers')}, "
                f"hashes equal: {kill.get('hashes_equal_uninterrupted')}")
            save()

    targets(res)
    save()
    print_table(res)


def targets(res: dict[str, Any]) -> None:
    st = [r["summary"] for r in res["runs"] if r["engine"] == "stream" and r["rc"] == 0]
    if not st:
        return
    rf = res.get("read_floor")
    read_floor_s = (sum(int(v) for v in res["layer_bytes"].values()) / (rf["gb_per_s"] * 1e9)) if rf else None
    wall = statistics.median(s["total_s"] for s in st)
    gpu = statistics.median(s["gpu_work_s"] for s in st)
    bound = max(gpu, read_floor_s or 0.0)
    rss = statistics.median(s["peak_rss_gib_time_v"] or s["peak_rss_gib_report"] for s in st)
    one_layer = max(int(v) for v in res["layer_bytes"].values())
    acts = None
    k = (res.get("kill") or {}).get("killed_run", {}).get("kill") or {}
    files = k.get("work_dir_files") or {}
    act_files = [v for n, v in files.items()
                 if n.startswith("activations-after-") and n.endswith((".pt", ".safetensors"))]
    acts = max(act_files) if act_files else res["activation_bytes_formula"]
    rss_bound = (3 * one_layer + acts) / 2**30
    res["targets"] = {
        "stream_total_s_median": wall, "gpu_work_s_median": gpu,
        "read_floor_s": round(read_floor_s, 2) if read_floor_s else None,
        "wall_target_s": round(1.15 * bound, 2), "wall_holds": wall <= 1.15 * bound,
        "wall_over_bound": round(wall / bound, 3),
        "one_layer_gib": round(one_layer / 2**30, 3), "activations_gib": round(acts / 2**30, 3),
        "activations_from": "the journaled activations file" if act_files else "formula tokens x hidden x 2",
        "rss_peak_gib_median": rss, "rss_target_gib": round(rss_bound, 2), "rss_holds": rss <= rss_bound,
    }


def print_table(res: dict[str, Any]) -> None:
    rows = []
    for eng in ("memory", "stream"):
        ss = [r["summary"] for r in res["runs"] if r["engine"] == eng and r["rc"] == 0]
        if not ss:
            continue
        rows.append((eng, spread([s["wall_s"] for s in ss]), spread([s["total_s"] for s in ss]),
                     spread([s["load_s"] for s in ss]), spread([s["calibrate_and_solve_s"] for s in ss]),
                     spread([s["save_s"] for s in ss]), spread([s["peak_rss_gib_time_v"] for s in ss]),
                     spread([s["gpu_peak_allocated_gib"] for s in ss]), spread([s["gpu_peak_nvidia_smi_gib"] for s in ss])))  # noqa: E501
    print("engine  | process wall s | report total s | load s | calib+solve s | save s | peak RSS GiB | GPU alloc GiB | GPU smi GiB")  # noqa: E501
    layer_bytes = sum(int(v) for v in res.get("layer_bytes", {}).values())
    by_threads = []
    for t in sorted({r["read_threads"] for r in res["runs"] if r["engine"] == "stream" and r["rc"] == 0}, key=str):
        ss = [r["summary"] for r in res["runs"] if r["engine"] == "stream" and r["rc"] == 0 and r["read_threads"] == t]
        by_threads.append((f"stream, read threads {t or 'default'}", spread([s["total_s"] for s in ss]),
                     spread([s["gpu_work_s"] for s in ss]), spread([s["read_s"] for s in ss]),
                     spread([layer_bytes / s["read_s"] / 1e9 for s in ss if s["read_s"]]),
                     spread([s["io_hidden_s"] for s in ss])))
    for eng, *cols in rows:
        print(eng.ljust(8) + "| " + " | ".join("-" if c is None else f"{c['median']} [{c['min']}-{c['max']}] n={c['n']}"
                                               for c in cols))
    if by_threads:
        print("stream runs by read threads | report total s | GPU work s | read s | read GB/s | I/O hidden s")
    for name, *cols in by_threads:
        print(name + " | " + " | ".join("-" if c is None else f"{c['median']} [{c['min']}-{c['max']}] n={c['n']}"
                                        for c in cols))
    if "reads" in res:
        print("reader alone (GB/s by threads): " + ", ".join(f"{t}: {c['median']} [{c['min']}-{c['max']}] n={c['n']}"
                                                            for t, c in res["reads"]["summary"].items()))
    for r in res["runs"]:
        if r["engine"] == "stream" and r["rc"] == 0 and r["summary"].get("gpu_peak_at"):
            print(f"stream GPU peak at {r['summary']['gpu_peak_at']}")
    for key in ("read_floor", "write_floor", "memory_vs_stream_tensors", "loss_ratio_stream_over_memory", "targets",
                "determinism"):
        if key in res:
            print(f"{key}: {json.dumps(res[key])}")
    if "kill" in res:
        k = res["kill"]
        print(f"kill: {json.dumps(k['killed_run'].get('kill'))[:400]}")
        print(f"resume: rc {k['resume']['rc']} after layers {k['resume'].get('resumed_after_layers')} total "
              f"{k['resume'].get('total_s')} s; hashes equal uninterrupted: {k.get('hashes_equal_uninterrupted')} "
              f"differing {k.get('files_differing')}")
    for s in res["skipped"]:
        print(f"skipped: {s}")
    for r in res["runs"]:
        if r["rc"] != 0:
            print(f"FAILED {r['tag']} rc {r['rc']}:\n  " + "\n  ".join(r["log_tail"]))


if __name__ == "__main__":
    main()
