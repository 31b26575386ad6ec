"""The `serve` command: dry-run, check, or serve in the foreground until interrupted."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mtpquant.core.run import Run
from mtpquant.serving.serve import (
    Launch,
    ServeError,
    build_launch,
    check_mtp_present,
    free_port,
    load_profile,
    model_for,
    running,
)


def launch_for(args: argparse.Namespace, console: Any, port: int | None = None, mtp: bool | None = None,
               dry_run: bool = False) -> Launch:
    """Profile + artifact (+ dequantized copy where the profile says so) -> the Launch to run."""
    profile = load_profile(args.profile)
    run = Run(args.run)
    artifact = Path(args.artifact or run.artifact)
    no_mtp = getattr(args, "no_mtp", False) if mtp is None else not mtp
    tokens = 0 if no_mtp else getattr(args, "mtp_tokens", None)
    name = args.name or artifact.name
    if dry_run:  # nothing is read or written: the command a user would type
        model_dir = artifact if not profile.dequantize else run.serve_copy(artifact)
    else:
        model_dir = model_for(profile, artifact, run.serve_copy(artifact), console)
    launch = build_launch(profile, model_dir, name, port=port or args.port, mtp_tokens=tokens)
    if not dry_run and model_dir == artifact:
        launch.notes.clear()  # nothing was dequantized (an unquantized checkpoint)
    if launch.mtp_tokens > 0 and not dry_run and not getattr(args, "skip_checks", False):
        check_mtp_present(model_dir)
    return launch


def print_launch(launch: Launch, console: Any) -> None:
    for note in launch.notes:
        console.print(f"[bold yellow]{note}[/]")
    console.print("[bold]environment[/]:", " ".join(f"{k}={v}" for k, v in sorted(launch.env.items())) or "(none)",
                  highlight=False, soft_wrap=True)
    print(launch.shell(), flush=True)  # stdout: the exact command, one line, for copying and for tests


def serve_command(args: argparse.Namespace, console: Any) -> int:
    if args.check_manifest and not args.dry_run:
        from mtpquant.chain.manifest import check_manifest, raise_on_mismatch

        artifact = Path(args.artifact or Run(args.run).artifact)
        raise_on_mismatch(check_manifest(artifact), artifact)
        console.print(f"[green]intact[/]: {artifact} matches its manifest")
    if args.dry_run:
        launch = launch_for(args, console, dry_run=True)
        if not Path(launch.model_dir).is_dir():
            console.print(f"[yellow]note[/]: {launch.model_dir} does not exist yet (`make artifact` builds it); "
                          "this is the command that would serve it")
        print_launch(launch, console)
        return 0
    launch = launch_for(args, console, port=args.port or (free_port() if args.check else None))
    profile = load_profile(args.profile)
    print_launch(launch, console)
    run = Run(args.run)
    log = run.serve_log(launch.served_name, bool(launch.mtp_tokens))
    with running(launch, log, profile.ready_timeout_s) as server:
        ready = round(server.ready_seconds, 1)
        run.record("serve", {"command": launch.shell(), "argv": launch.argv, "env": launch.env,
                             "base_url": launch.base_url, "ready_seconds": ready, "log": str(log),
                             "notes": launch.notes})
        console.print(f"[green]ready[/] in {ready} s at {launch.base_url}/v1 (model {launch.served_name!r}); "
                      f"log {log}")
        if args.check:
            return 0
        console.print("serving; Ctrl-C stops it")
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
        raise ServeError(f"vLLM exited with code {server.proc.returncode if server.proc else '?'}; log {log}")
