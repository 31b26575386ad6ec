"""`python -m mtpquant.images {build,push,pull,run,tag,plan}`: the images' command line (nox -s images / pull
and the stage sessions' --runtime docker call it)."""

from __future__ import annotations

import argparse
import sys

from mtpquant.core.errors import MtpquantError, one_line
from mtpquant.images.context import plan_lines, spec
from mtpquant.images.engine import build, publish, pull, run
from mtpquant.images.pins import FLAVOURS

DOC = __doc__


def _parse_bases(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, ref = item.partition("=")
        if not sep:
            raise MtpquantError(f"--base {item}: expected KEY=REF (KEY: cpu, cuda, cuda-devel)")
        out[key] = ref
    return out


def _selected(args: argparse.Namespace) -> list[tuple[str, str]]:
    images = list(FLAVOURS) if args.image == "all" else [args.image]
    return [(i, f) for i in images for f in ([args.flavour] if args.flavour != "all" else FLAVOURS[i])
            if f in FLAVOURS[i] or args.image != "all"]


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)
    p = argparse.ArgumentParser(prog="python -m mtpquant.images", description=DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["build", "push", "pull", "run", "tag", "plan"])
    p.add_argument("--image", default="all", choices=["all", *FLAVOURS])
    p.add_argument("--flavour", default="cpu", choices=["all", "cpu", "cuda", "cuda-source"])
    p.add_argument("--base", action="append", default=[], metavar="KEY=REF",
                   help="use this base (a mirror's name@sha256:...) instead of pinned/images.lock's")
    p.add_argument("--online", action="store_true", help="fetch wheels from the index instead of the wheelhouse")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--drop-build-cache", action="store_true", help="build: remove the intermediate images "
                   "after each build (disk: they hold the wheelhouse and a second venv)")
    p.add_argument("--raw", action="store_true", help="build: keep the legacy builder's output as it is (not "
                   "normalized: timestamps differ between builds)")
    p.add_argument("--registry", help="push: REGISTRY[/NAMESPACE] to publish to (recorded in images.lock)")
    p.add_argument("--mount", action="append", default=[], help="run: host directory mounted at the same path")
    p.add_argument("--user", help="run: UID:GID (default: the image's non-root user)")
    p.add_argument("--gpus", action="store_true", help="run: all GPUs")
    p.add_argument("--shm-size", help="run: /dev/shm size (e.g. 64g)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="run: environment variable")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["release"]:  # nox -s images-cuda: its own options
        from mtpquant.images.release import main as release

        return release(argv[1:])
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        bases = _parse_bases(args.base)
        targets = _selected(args)
        specs = [spec(i, f, bases, args.online) for i, f in targets]
        if args.action in ("run",) and len(specs) != 1:
            raise MtpquantError("run: name one --image and one --flavour")
        for s in specs:
            if args.action == "tag":
                print(s.local_ref)
            elif args.action == "plan":
                print("\n".join(plan_lines(s)) + "\n")
            elif args.action == "build":
                console.print(f"[bold]building[/] {s.local_ref}")
                image_id = build(s, log=lambda line: console.print(line, markup=False, highlight=False),
                                 no_cache=args.no_cache, normalize=not args.raw,
                                 keep_cache=not args.drop_build_cache)
                print(f"{s.local_ref} {image_id}")
            elif args.action == "push":
                if not args.registry:
                    raise MtpquantError("push: --registry REGISTRY is required")
                entry = publish(s, args.registry, log=lambda line: console.print(line, markup=False))
                print(f"{s.key} {entry['ref']}")
            elif args.action == "pull":
                print(pull(s, log=lambda line: console.print(line, markup=False)))
            elif args.action == "run":
                ref = pull(s, log=lambda line: console.print(line, markup=False))
                env = dict(e.split("=", 1) for e in args.env)
                return run(ref, command, args.mount, args.user, args.gpus, args.shm_size, env,
                           log=lambda line: print(line, flush=True))
    except MtpquantError as e:
        console.print(f"[red]error:[/] {escape(one_line(e))}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
