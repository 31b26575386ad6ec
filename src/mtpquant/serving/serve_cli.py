"""The `serve` command: dry-run, check, or serve in the foreground until interrupted.

The CLI (mtpquant.cli, the one place that parses arguments) hands over typed values: a `Target` (which
artifact of which run, on which profile, port and name) and the serve options; eval and bench reuse `Target`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Target:
    """What to serve: an artifact of a run directory (default RUN/artifact) with a serve profile."""
    run: Path
    profile: str = "cpu"
    artifact: Path | None = None
    port: int | None = None  # None: the profile's (serve) or a free one (eval, bench, serve --check)
    name: str | None = None  # served model name; None: the artifact directory's name

    @property
    def artifact_dir(self) -> Path:
        return self.artifact or Run(self.run).artifact


@dataclass(frozen=True)
class ServeOptions:
    mtp: bool = True
    mtp_tokens: int | None = None  # None: the profile's num_speculative_tokens
    dry_run: bool = False
    check: bool = False  # start, wait until ready, stop
    skip_checks: bool = False  # start vLLM even on a checkpoint that looks wrong
    check_manifest: bool = False


def launch_for(target: Target, console: Any, port: int | None = None, mtp: bool = True,
               mtp_tokens: int | None = None, skip_checks: bool = False, dry_run: bool = False) -> Launch:
    """Profile + artifact (+ dequantized copy where the profile says so) -> the Launch to run."""
    profile = load_profile(target.profile)
    run = Run(target.run)
    artifact = target.artifact_dir
    tokens = mtp_tokens if mtp else 0
    name = target.name or artifact.name
    if dry_run:  # nothing is read or written: the command a user would type
        model_dir = artifact if not profile.dequantize else run.serve_copy(artifact)
    else:
        model_dir = model_for(profile, artifact, run.serve_copy(artifact), console)
    launch = build_launch(profile, model_dir, name, port=port or target.port, mtp_tokens=tokens)
    if not dry_run and model_dir == artifact:
        launch.notes.clear()  # nothing was dequantized (an unquantized checkpoint)
    if launch.mtp_tokens > 0 and not dry_run and not skip_checks:
        check_mtp_present(model_dir)
    return launch


def print_launch(launch: Launch, console: Any) -> None:
    for note in launch.notes:
        console.print(f"[bold yellow]{note}[/]")
    console.print("[bold]environment[/]:", " ".join(f"{k}={v}" for k, v in sorted(launch.env.items())) or "(none)",
                  highlight=False, soft_wrap=True)
    print(launch.shell(), flush=True)  # stdout: the exact command, one line, for copying and for tests


def serve_command(target: Target, opts: ServeOptions, console: Any) -> int:
    if opts.check_manifest and not opts.dry_run:
        from mtpquant.chain.manifest import check_manifest, raise_on_mismatch

        artifact = target.artifact_dir
        raise_on_mismatch(check_manifest(artifact), artifact)
        console.print(f"[green]intact[/]: {artifact} matches its manifest")
    if opts.dry_run:
        launch = launch_for(target, console, mtp=opts.mtp, mtp_tokens=opts.mtp_tokens, dry_run=True)
        if not Path(launch.model_dir).is_dir():
            console.print(f"[yellow]note[/]: {launch.model_dir} does not exist yet (`make artifact` builds it); "
                          "this is the command that would serve it")
        print_launch(launch, console)
        return 0
    launch = launch_for(target, console, port=target.port or (free_port() if opts.check else None), mtp=opts.mtp,
                        mtp_tokens=opts.mtp_tokens, skip_checks=opts.skip_checks)
    profile = load_profile(target.profile)
    print_launch(launch, console)
    run = Run(target.run)
    log = run.serve_log(launch.served_name, bool(launch.mtp_tokens))
    with running(launch, log, profile.ready_timeout_s) as server:
        ready = round(server.ready_seconds, 1)
        run.record("serve", {"command": launch.shell(), "argv": launch.argv, "env": launch.env,
                             "base_url": launch.base_url, "ready_seconds": ready, "log": str(log),
                             "notes": launch.notes})
        console.print(f"[green]ready[/] in {ready} s at {launch.base_url}/v1 (model {launch.served_name!r}); "
                      f"log {log}")
        if opts.check:
            return 0
        console.print("serving; Ctrl-C stops it")
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
        raise ServeError(f"vLLM exited with code {server.proc.returncode if server.proc else '?'}; log {log}")
