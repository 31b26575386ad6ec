"""`python -m mtpquant <stage>`: one command per stage, the same in a container or a venv.

Stages read and write a run directory (default layout below) and record what they consumed:
    RUN/base/          prepare      the BF16 source checkpoint (fixture, local path or pinned hub commit)
    RUN/quantized/     quantize     llm-compressor output (MTP layer absent)    + RUN/quantize.json
    RUN/artifact/      inject-mtp   quantized + MTP layer(s) in BF16            + RUN/inject-mtp.json
                       verify                                                   + RUN/verify.json
    RUN/artifact/manifest.json      manifest
The whole layout: mtpquant.core.run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from mtpquant.core.atomic import atomic_write_json
from mtpquant.core.errors import MtpquantError, one_line
from mtpquant.core.run import Run, manifest_of
from mtpquant.model.families import FAMILIES
from mtpquant.model.schemes import DEFAULT, SCHEMES, scheme

console = Console(stderr=True)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a fraction in (0, 1] expected")
    return value


def _done(run: Run, stage: str, inputs: dict, args: argparse.Namespace) -> bool:
    """True (and says so) when the stage already ran with these inputs and its outputs are as it left them."""
    if args.force or not run.done(stage, inputs):
        return False
    console.print(f"[green]{stage}[/]: done, inputs unchanged since {run.record_path(stage)}; skipped "
                  "(--force redoes it)", soft_wrap=True, highlight=False)
    return True


def _inputs(*paths: Path, **extra: Any) -> dict[str, Any]:
    from mtpquant.core.run import code_sha256, signature

    return {"files": signature(*paths), "code": code_sha256(), **extra}


def cmd_fixture(args: argparse.Namespace) -> int:
    from mtpquant.model.recipes import FixtureSpec
    from mtpquant.tiny.fixture import write_fixture

    spec = FixtureSpec(num_hidden_layers=args.layers, first_k_dense_replace=args.dense_layers,
                       n_routed_experts=args.experts, num_nextn_predict_layers=args.mtp_layers,
                       num_shards=args.shards, seed=args.seed)
    spec.check("fixture options")
    out = write_fixture(args.family, spec, Path(args.out))
    console.print(f"[green]wrote[/] {args.family} fixture to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mtpquant.chain.prepare import prepare
    from mtpquant.model import recipes

    run = Run(args.run)
    run.root.mkdir(parents=True, exist_ok=True)
    inputs = _inputs(recipes.resolve_path("models", args.model), model=args.model)
    if _done(run, "prepare", inputs, args):
        return 0
    rec = prepare(args.model, run.base)
    rec["resume"] = run.resume_entry(inputs, [run.base])
    run.record("prepare", rec)
    console.print(f"[green]prepared[/] {rec['recipe']} -> {rec['output']}")
    return 0


def _loading(stage: str, *modules: str) -> None:
    from mtpquant.core.progress import loading

    loading(stage, *modules)


def _say(line: str) -> None:
    console.print(f"[dim]note[/]: {line}", highlight=False, soft_wrap=True)


def _mtp_tensors(model: Path) -> tuple[list[str], int]:
    """The MTP layers' name prefixes and tensor count in a checkpoint; none where it cannot be read (the stage
    itself then reports why, in its own words)."""
    from mtpquant.core.checkpoint import Checkpoint
    from mtpquant.model.families import family_for

    try:
        ck = Checkpoint(model)
        prefixes = family_for(ck.config, str(model / "config.json")).mtp_prefixes(ck.config)
        return prefixes, sum(1 for n in ck.tensors if n.startswith(tuple(prefixes)))
    except Exception:  # noqa: BLE001 (any unreadable input is quantize's to report)
        return [], 0


STREAM_ONLY = ("restart", "read_threads", "split")  # quantize options that only the stream engine takes


def _quantize_engine(args: argparse.Namespace, model: Path) -> tuple[str, str | None]:
    """(The engine `quantize` runs, why it was chosen or None): as asked, or for `auto` the stream engine where an
    option only it takes was given, else the one quantize_engine_here picks for this checkpoint on this node. The
    why goes into the report and the stage's last line, not before: a bad input found later stays a one-line
    error."""
    if args.read_threads is not None and args.read_threads < 1:
        raise MtpquantError(f"quantize: --read-threads: expected at least 1, got {args.read_threads}")
    given = [f"--{o.replace('_', '-')}" for o in STREAM_ONLY if getattr(args, o) not in (None, False)]
    if args.engine == "memory" and given:
        raise MtpquantError(f"quantize: {', '.join(given)}: only the stream engine takes it (--engine stream)")
    if args.engine != "auto":
        return args.engine, None
    if given:
        return "stream", f"--engine auto: {', '.join(given)} given"
    from mtpquant.calib.plan import quantize_engine_here

    engine, why = quantize_engine_here(model, args.recipe, args.calibration)
    return engine, f"--engine auto: {why}"


def cmd_quantize(args: argparse.Namespace) -> int:
    from mtpquant.calib.quantize import quantize
    from mtpquant.chain.manifest import consumed
    from mtpquant.core.quiet import stage_logs
    from mtpquant.model import recipes

    run = Run(args.run)
    model = Path(args.model or run.base)
    out = Path(args.out or run.quantized)
    cpath = recipes.resolve_path("calibration", args.calibration)
    local = [recipes.REPO_ROOT / s.local for s in recipes.load("calibration", cpath).sources if s.local]
    inputs = _inputs(model, recipes.resolve_path("quant", args.recipe), cpath, *local, engine=args.engine)
    if _done(run, "quantize", inputs, args):
        return 0
    _loading("quantize", "torch", "transformers")
    with stage_logs(run.stage_log("quantize"), *_mtp_tensors(model), _say):
        engine, why = _quantize_engine(args, model)
        if engine == "stream":
            from mtpquant.calib.stream import quantize_stream

            rep = quantize_stream(model, args.recipe, args.calibration, out, restart=args.restart,
                                  split=args.split or "layers", read_threads=args.read_threads)
        else:
            rep = quantize(model, args.recipe, args.calibration, out)
    if rep["rank"] != 0:  # torchrun: rank 0 reports
        return 0
    rep["consumed"] = consumed([Path(rep["recipe"]["path"]), Path(rep["calibration"]["path"]),
                                model / "config.json", model / "model.safetensors.index.json"])
    rep["resume"] = run.resume_entry(inputs, [out])
    rep["engine_chosen"] = why
    run.record("quantize", rep)
    console.print(f"[green]quantized[/] {rep['quantized_linears']} Linears in {rep['seconds']['total']} s "
                  f"(median GPTQ loss {rep['gptq_loss_median']:.4g}, {len(rep['few_token_experts'])} experts "
                  f"routed few tokens) -> {out}; engine {engine}" + (f" ({why})" if why else ""))
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    from mtpquant.chain.inject_mtp import inject_mtp

    run = Run(args.run)
    base, quantized, out = Path(args.base or run.base), Path(args.quantized or run.quantized), Path(
        args.out or run.artifact)
    inputs = _inputs(base, quantized, max_shard_bytes=args.max_shard_bytes)
    if _done(run, "inject-mtp", inputs, args):
        return 0
    rep = inject_mtp(base, quantized, out, max_shard_bytes=args.max_shard_bytes)
    rep["resume"] = run.resume_entry(inputs, [out])
    run.record("inject-mtp", rep)
    console.print(f"[green]injected[/] {rep['tensors']} MTP tensors ({rep['bytes'] / 2**20:.1f} MiB, layers "
                  f"{rep['mtp_layers']}) at {rep['throughput_mb_s']} MB/s -> {rep['output']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from mtpquant.chain.verify import raise_on_failure, render, verify, verify_record

    run = Run(args.run)
    art, base = Path(args.artifact or run.artifact), Path(args.base or run.base)
    inputs = _inputs(art, base, sample=args.sample)
    if (run.read_record("verify") or {}).get("ok") and _done(run, "verify", inputs, args):
        return 0
    _loading("verify", "torch", "compressed_tensors")  # the dequantizer
    checks = verify(art, base, sample=args.sample)
    run.record("verify", verify_record(art, base, checks) | {"resume": run.resume_entry(inputs, [])})
    Console(width=None if sys.stdout.isatty() else 120).print(render(checks, f"verify {art}"))
    raise_on_failure(checks)
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from mtpquant.chain.manifest import write_manifest

    run = Run(args.run)
    art = Path(args.artifact or run.artifact)
    m = write_manifest(art, run)  # cheap next to the stages before it, and it reads their records: always redone
    console.print(f"[green]manifest[/] {len(m['files'])} files -> {manifest_of(art)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mtpquant.chain.manifest import check_manifest, raise_on_mismatch

    result = check_manifest(Path(args.artifact))
    raise_on_mismatch(result, Path(args.artifact))
    console.print(f"[green]intact[/] {result['files']} files ({result['bytes'] / 2**30:.2f} GiB) match "
                  f"{manifest_of(Path(args.artifact))}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from mtpquant.chain.publish import publish, render

    plan = publish(Run(args.run), args.repo, Path(args.artifact) if args.artifact else None, dry_run=args.dry_run)
    out = Console(width=None if sys.stdout.isatty() else 160)
    out.print(render(plan))
    if plan["dry_run"]:
        out.print(plan["card"], markup=False, highlight=False)
    else:
        console.print(f"[green]published[/] {plan['url']}")
    return 0


def cmd_lock_sources(args: argparse.Namespace) -> int:
    from mtpquant.chain.hub import lock_models

    for path in lock_models(args.models):
        console.print(f"[green]locked[/] {path}")
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    from mtpquant.chain.preflight import preflight

    for line in preflight(args.model, args.calibration):
        console.print(f"[green]ok[/] {line}")
    return 0


def _disk_gbps(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        read, write = (float(x) for x in text.split(","))
    except ValueError:
        raise MtpquantError(f"--disk-gbps: expected READ,WRITE in GB/s (e.g. 12,8), got {text!r}") from None
    if read <= 0 or write <= 0:
        raise MtpquantError(f"--disk-gbps: rates must be > 0, got {text!r}")
    return read, write


def cmd_plan(args: argparse.Namespace) -> int:
    from mtpquant.calib.plan import GPUSpec, make_plan, refuse, render

    plan = make_plan(args.model, args.calibration, args.recipe, GPUSpec.of(args.gpu, args.gpus, args.gpu_memory_gib),
                     host_ram_gib=args.host_ram_gib, disk_gib=args.disk_gib, engine=args.engine,
                     disk_gbps=_disk_gbps(args.disk_gbps))
    Console().print(render(plan))
    if args.json:
        atomic_write_json(Path(args.json), plan.to_json())
    refuse(plan)
    return 0


def cmd_train_tiny(args: argparse.Namespace) -> int:
    import dataclasses

    from mtpquant.tiny.train_tiny import TrainConfig, run_training

    cfg = TrainConfig(seed=args.seed)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.lr is not None:
        cfg = dataclasses.replace(cfg, lr=args.lr)
    if args.data_only:
        from mtpquant.model.recipes import REPO_ROOT
        from mtpquant.tiny.tiny_task import write_data

        for p in write_data(REPO_ROOT):
            console.print(f"[green]wrote[/] {p}")
        return 0
    run_training(cfg, Path(args.out), console, args.device, Path(args.init) if args.init else None)
    return 0


def _target(args: argparse.Namespace) -> Any:
    """The served artifact of serve/eval/bench as a typed value."""
    from mtpquant.serving.serve_cli import Target

    return Target(run=Path(args.run), profile=args.profile, artifact=Path(args.artifact) if args.artifact else None,
                  port=args.port, name=args.name)


def cmd_serve(args: argparse.Namespace) -> int:
    from mtpquant.serving.serve_cli import ServeOptions, serve_command

    opts = ServeOptions(mtp=not args.no_mtp, mtp_tokens=args.mtp_tokens, dry_run=args.dry_run, check=args.check,
                        skip_checks=args.skip_checks, check_manifest=args.check_manifest)
    return serve_command(_target(args), opts, console)


def cmd_eval(args: argparse.Namespace) -> int:
    from mtpquant.serving.evaluate import EvalOptions, eval_command

    opts = EvalOptions(suite=args.suite, base_url=args.base_url, tokenizer=args.tokenizer, mtp=not args.no_mtp,
                       label=args.label)
    return eval_command(_target(args), opts, console)


def cmd_bench(args: argparse.Namespace) -> int:
    from mtpquant.serving.bench import bench_command

    return bench_command(_target(args), args.grid, console)


def cmd_dequantize(args: argparse.Namespace) -> int:
    from mtpquant.model.dequantize import dequantize_artifact

    out = dequantize_artifact(Path(args.artifact), Path(args.out))
    console.print(f"[bold yellow]DEQUANTIZED[/] {args.artifact} -> {out} (BF16, same weight values)")
    return 0


def cmd_rtn(args: argparse.Namespace) -> int:
    from mtpquant.model.dequantize import rtn_checkpoint

    chosen = scheme(args.scheme)
    out = rtn_checkpoint(Path(args.base), Path(args.out), chosen)
    console.print(f"[green]RTN {chosen.label} baseline[/] (routed experts, {chosen.description}) -> {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mtpquant.serving.report import write_report

    path = write_report(Run(args.run), Path(args.artifact) if args.artifact else None)
    console.print(f"[green]report[/] -> {path}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from mtpquant.serving.summary import summary_command

    missing = [r for r in args.run if not Path(r).is_dir()]
    if missing:
        raise MtpquantError(f"{missing[0]}: run directory not found")
    return summary_command([Path(r) for r in args.run], Console(width=None if sys.stdout.isatty() else 140))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtpquant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    f = sub.add_parser("fixture", help="write a tiny random checkpoint of a family in its real on-disk layout")
    f.add_argument("--family", required=True, choices=list(FAMILIES))
    f.add_argument("--out", required=True)
    f.add_argument("--layers", type=int, default=3, help="decoder layers (MTP excluded)")
    f.add_argument("--dense-layers", type=int, default=1, help="leading dense (non-MoE) layers")
    f.add_argument("--experts", type=int, default=8)
    f.add_argument("--mtp-layers", type=int, default=1)
    f.add_argument("--shards", type=int, default=3)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(fn=cmd_fixture)

    def stage(name: str, fn, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--run", required=True, help="run directory")
        if name in ("prepare", "quantize", "inject-mtp", "verify"):
            s.add_argument("--force", action="store_true",
                           help="redo the stage even when its recorded inputs and outputs are unchanged")
        s.set_defaults(fn=fn)
        return s

    s = stage("prepare", cmd_prepare, "materialize the base checkpoint of a model recipe in RUN/base")
    s.add_argument("--model", required=True, help="model recipe name or YAML path")
    s = stage("quantize", cmd_quantize, "GPTQ on the routed experts (llm-compressor), the recipe's scheme")
    s.add_argument("--model", help="BF16 checkpoint (default RUN/base)")
    s.add_argument("--recipe", default="w4a16-asym-g128", help="quant recipe name or YAML path")
    s.add_argument("--calibration", default="tiny-local", help="calibration recipe name or YAML path")
    s.add_argument("--out", help="default RUN/quantized")
    s.add_argument("--engine", choices=["auto", "memory", "stream"], default="auto",
                   help="memory: load the whole model, llm-compressor oneshot (the reference); stream: one decoder "
                   "layer at a time from the shards, resumable (OUT.work/journal.json); auto (default): memory "
                   "where its host RAM fits this node (`mtpquant plan` models it), else stream")
    s.add_argument("--restart", action="store_true", help="stream: discard a previous run's journal, start over")
    s.add_argument("--read-threads", type=int, default=None, metavar="N",
                   help="stream: threads that read a layer from the shards (default 4)")
    s.add_argument("--split", choices=["layers", "experts"], default=None,
                   help="stream under torchrun: layers (layer i on rank i %% ranks: I/O spread, GPU work serial) or "
                   "experts (every rank runs every layer and solves its share of the experts: GPU work spread); "
                   "both give the one-process artifact bit for bit; `mtpquant plan` says which is faster")
    s = stage("inject-mtp", cmd_inject, "copy the MTP layer(s) from the base into the quantized checkpoint")
    s.add_argument("--base", help="default RUN/base")
    s.add_argument("--quantized", help="default RUN/quantized")
    s.add_argument("--out", help="default RUN/artifact (may equal --quantized)")
    s.add_argument("--max-shard-bytes", type=int, default=5 << 30)
    s = stage("verify", cmd_verify, "prove the artifact is what it claims (exit 3 on failure)")
    s.add_argument("--artifact", help="default RUN/artifact")
    s.add_argument("--base", help="default RUN/base")
    s.add_argument("--sample", type=_fraction, default=None,
                   help="value-check a seeded fraction of the quantized Linears (default: all, up to 4096; "
                        "1 for all of any model; coverage printed)")
    s = stage("manifest", cmd_manifest, "SHA256 of every artifact file plus provenance")
    s.add_argument("--artifact", help="default RUN/artifact")
    s = sub.add_parser("check", help="re-hash an artifact against its manifest (exit 3 on any difference)")
    s.add_argument("artifact", help="the artifact directory, with the manifest `mtpquant manifest` wrote")
    s.set_defaults(fn=cmd_check)
    s = sub.add_parser("train-tiny", help="train the tiny GLM-4.5-layout arithmetic model with its MTP layer")
    s.add_argument("--out", default="data/models/tiny-arith")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: the committed model's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-only", action="store_true", help="only (re)write the task's data files")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--init", help="continue from a checkpoint train-tiny wrote (fresh optimizer and schedule)")
    s.set_defaults(fn=cmd_train_tiny)

    def serving(s: argparse.ArgumentParser) -> None:
        s.add_argument("--profile", default="cpu", help="serve profile name or YAML (recipes/serve/)")
        s.add_argument("--artifact", help="checkpoint to serve (default RUN/artifact)")
        s.add_argument("--port", type=int, default=None, help="default: 8000 for serve, a free port otherwise")
        s.add_argument("--name", help="served model name (default: the artifact directory's name)")

    s = stage("serve", cmd_serve, "serve an artifact with vLLM (profile from recipes/serve/) until interrupted")
    serving(s)
    s.add_argument("--no-mtp", action="store_true", help="serve without MTP speculative decoding")
    s.add_argument("--mtp-tokens", type=int, help="override the profile's num_speculative_tokens")
    s.add_argument("--dry-run", action="store_true", help="print the exact command and environment, start nothing")
    s.add_argument("--check", action="store_true", help="start, wait until ready, stop (exit 0 if it served)")
    s.add_argument("--skip-checks", action="store_true",
                   help="start vLLM even on a checkpoint that looks wrong (to see vLLM's own error)")
    s.add_argument("--check-manifest", action="store_true",
                   help="first re-hash the artifact against its manifest (a download's integrity; exit 3 if not)")
    s = stage("eval", cmd_eval, "lm-eval against a served endpoint (suite from recipes/eval/)")
    serving(s)
    s.add_argument("--suite", default="tiny", help="eval suite name or YAML (recipes/eval/)")
    s.add_argument("--base-url", help="an already running server (else one is started with --profile)")
    s.add_argument("--tokenizer", help="default: the served checkpoint")
    s.add_argument("--no-mtp", action="store_true")
    s.add_argument("--label", default=None, help="name of this result (default: the artifact's name)")
    s = stage("bench", cmd_bench, "vllm bench serve over a grid, with and without MTP")
    serving(s)
    s.add_argument("--grid", default="tiny", help="bench grid name or YAML (recipes/bench/)")
    s = sub.add_parser("dequantize", help="BF16 copy of a quantized artifact (same values; for CPU serving)")
    s.add_argument("--artifact", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_dequantize)
    s = sub.add_parser("rtn", help="round-to-nearest baseline of a base checkpoint's routed experts (BF16)")
    s.add_argument("--base", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--scheme", default=DEFAULT.name, choices=sorted(SCHEMES), help="quantization scheme")
    s.set_defaults(fn=cmd_rtn)
    s = stage("report", cmd_report, "markdown report of an artifact: verify, eval, bench, commands, versions")
    s.add_argument("--artifact", help="default RUN/artifact")
    s = stage("publish", cmd_publish, "upload a verified artifact, manifest and report (model card) in one commit")
    s.add_argument("--repo", required=True, help="hub repo id, ORG/NAME")
    s.add_argument("--artifact", help="default RUN/artifact")
    s.add_argument("--dry-run", action="store_true", help="list every file (size, sha256) and the card; upload nothing")
    s = sub.add_parser("summary", help="one panel of the runs' verdicts, accuracies, MTP acceptance, KL, bench")
    s.add_argument("--run", action="append", required=True, help="run directory (repeat for several)")
    s.set_defaults(fn=cmd_summary)
    s = sub.add_parser("lock-sources", help="write pinned/sources/<model>.lock from the hub (size + sha256 per file)")
    s.add_argument("models", nargs="+", help="model recipes with a hub source at a pinned commit")
    s.set_defaults(fn=cmd_lock_sources)
    s = sub.add_parser("preflight", help="refuse a real run this machine cannot finish (GPUs, pins)")
    s.add_argument("--model", required=True)
    s.add_argument("--calibration", required=True)
    s.set_defaults(fn=cmd_preflight)
    s = sub.add_parser("plan", help="predict GPU memory, host RAM, disk and time of quantize; refuse what cannot fit")
    s.add_argument("--model", required=True, help="model recipe name or YAML path")
    s.add_argument("--calibration", required=True, help="calibration recipe name or YAML path")
    s.add_argument("--recipe", default="w4a16-asym-g128", help="quant recipe name or YAML path")
    s.add_argument("--gpu", default="h200", help="GPU type: h100 or h200")
    s.add_argument("--gpus", type=int, default=8, help="GPUs (torchrun ranks)")
    s.add_argument("--gpu-memory-gib", type=float, help="usable memory per GPU (default: the type's)")
    s.add_argument("--host-ram-gib", type=float, help="host RAM; beyond it the model spills to disk")
    s.add_argument("--disk-gib", type=float, help="free disk; refuse a plan that needs more")
    s.add_argument("--disk-gbps", metavar="READ,WRITE", help="stream engine: this node's disk floor in GB/s (page "
                   "cache dropped, fsynced writes; default the H200 machine's where the engine was measured)")
    s.add_argument("--engine", choices=["auto", "memory", "stream"], default="auto",
                   help="quantize engine to plan for (auto: stream when the memory engine exceeds --host-ram-gib)")
    s.add_argument("--json", help="also write the plan as JSON here")
    s.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MtpquantError as exc:
        console.print(f"[bold red]error:[/] {escape(one_line(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: outputs are written atomically, nothing half-written was kept")
        return 130


if __name__ == "__main__":
    sys.exit(main())
