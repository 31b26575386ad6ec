"""Pin policy for Dockerfiles: every input an image build fetches must be pinned by content.

Rules (each violation is one line `file:line: rule: message`):
  base-digest    every FROM names an earlier stage or an image by @sha256 digest (an ARG's default or value counts)
  pip-lock       pip/uv installs come from a lockfile copied from pinned/ with --require-hashes, or are a local
                 path installed with --no-deps --no-index (a project tree or a wheel built in an earlier stage)
  git-sha        git clone/fetch/checkout name a 40-hex commit (or an ARG holding one)
  pipe-to-shell  nothing downloaded is piped into a shell (curl|sh, wget -O- | bash, ...)
  download-hash  curl/wget downloads are checked with `sha256sum -c` in the same RUN; ADD never fetches URLs
  apt-pin        apt-get install names pkg=version, or resolves against a dated snapshot (--snapshot)
  non-root       the final stage sets USER to a non-root user
Usage: python -m mtpquant.pins.policy [--build-arg K=V ...] Dockerfile...  (exit 1 on any violation)
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mtpquant.pins.locks import SHA40

DIGEST_REF = re.compile(r"@sha256:[0-9a-f]{64}$")
VAR = re.compile(r"\$\{?(\w+)(?::[-+][^}]*)?\}?")
SHELLS = {"sh", "bash", "dash", "zsh", "ash", "python", "python3"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.message}"


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # comment lines inside a continued instruction
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    return out


@dataclass
class Stage:
    name: str | None
    args: dict[str, str] = field(default_factory=dict)
    copied_locks: set[str] = field(default_factory=set)
    user: str | None = None


def _expand(value: str, env: dict[str, str]) -> str:
    return VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def _split_commands(script: str) -> list[list[str]]:
    """A RUN line split into simple commands (on && || ; | and newlines), each as shell words."""
    try:
        lex = shlex.shlex(script, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        words = list(lex)
    except ValueError:
        words = script.split()
    cmds, cur = [], []
    for w in words:
        if w and set(w) <= set(";&|()"):
            cmds.append(cur)
            cur = []
            if w == "|":
                cmds.append(["|"])
        else:
            cur.append(w)
    cmds.append(cur)
    return [c for c in cmds if c]


def _strip_assignments(cmd: list[str]) -> list[str]:
    """A simple command without its leading VAR=value words (and `export`)."""
    words = list(cmd)
    while words and (re.match(r"^\w+=", words[0]) or words[0] in ("export", "env")):
        words.pop(0)
    return words


def _pip_install(cmd: list[str]) -> list[str] | None:
    """The arguments after `install` if cmd is a pip/uv pip install, else None."""
    words = cmd
    for i, w in enumerate(words):
        base = w.rsplit("/", 1)[-1]
        is_pip = base.startswith("pip") or (base == "uv" and words[i + 1:i + 2] == ["pip"])
        if base in ("python", "python3") or base.startswith("python3."):
            is_pip = words[i + 1:i + 3] == ["-m", "pip"]
        if is_pip:
            rest = words[i + 1:]
            if "install" in rest:
                return rest[rest.index("install") + 1:]
    return None


OPTS_WITH_VALUE = {"-r", "--requirement", "-c", "--constraint", "-f", "--find-links", "-i", "--index-url",
                   "--extra-index-url", "--cert", "-t", "--target", "--prefix", "--root", "--python",
                   "--platform", "--python-version", "--implementation", "--abi", "--src", "--progress-bar"}


def check_pip(args: list[str], stage: Stage, env: dict[str, str]) -> str | None:
    reqs, targets, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a in OPTS_WITH_VALUE:
            if a in ("-r", "--requirement"):
                reqs.append(_expand(args[i + 1], env) if i + 1 < len(args) else "")
            i += 2
            continue
        if a.startswith("--requirement=") or (a.startswith("-r") and len(a) > 2):
            reqs.append(_expand(a.split("=", 1)[-1] if "=" in a else a[2:], env))
        elif a in ("-e", "--editable"):
            pass
        elif not a.startswith("-"):
            targets.append(_expand(a, env))
        i += 1
    local = [t for t in targets if t.startswith(("/", "./", ".")) or t.endswith(".whl")]
    remote = [t for t in targets if t not in local]
    if remote:
        return f"installs {' '.join(remote)} by name, outside the lockfile"
    if reqs:
        if "--require-hashes" not in args:
            return "installs a requirements file without --require-hashes"
        unlocked = [r for r in reqs if r not in stage.copied_locks]
        if unlocked:
            return f"-r {' '.join(unlocked)} is not a lockfile copied from pinned/ in this stage"
        return None
    if local and not ({"--no-deps", "--no-index"} <= set(args)):
        return "a local install must use --no-deps --no-index (its dependencies come from the lockfile)"
    return None if local else "pip install with nothing pinned to install"


def check_git(cmd: list[str], env: dict[str, str]) -> str | None:
    if not cmd or cmd[0].rsplit("/", 1)[-1] != "git":
        return None
    words = [w for w in cmd[1:] if not w.startswith("-")]
    # `git -C DIR ...`: skip the option's value
    if "-C" in cmd:
        k = cmd.index("-C")
        words = [w for w in cmd[k + 2:] if not w.startswith("-")]
    if not words or words[0] not in ("clone", "fetch", "checkout", "pull", "switch"):
        return None
    values = [_expand(w, env) for w in words[1:]]
    if any(SHA40.match(v) for v in values):
        return None
    return f"git {words[0]} without a 40-hex commit ({' '.join(words[1:]) or 'default branch'})"


def _snapshot_active(script: str, env: dict[str, str]) -> bool:
    """`--snapshot` on the apt line, and when it is conditional (${X:+--snapshot ...}), X is set."""
    if "--snapshot" not in script:
        return False
    cond = re.search(r"\$\{(\w+):\+--snapshot", script)
    return cond is None or bool(env.get(cond.group(1)))


def check_run(script: str, stage: Stage, env: dict[str, str]) -> list[tuple[str, str]]:
    problems = []
    cmds = [_strip_assignments(c) for c in _split_commands(script)]
    for k, cmd in enumerate(cmds):
        if not cmd:
            continue
        head = cmd[0].rsplit("/", 1)[-1]
        if head in ("curl", "wget") and k + 2 < len(cmds) and cmds[k + 1] == ["|"]:
            nxt = [w for w in cmds[k + 2] if w != "sudo"]
            if nxt and nxt[0].rsplit("/", 1)[-1] in SHELLS:
                problems.append(("pipe-to-shell", f"{head} output piped into {nxt[0]}"))
                continue
        if head in ("curl", "wget") and "sha256sum" not in script:
            problems.append(("download-hash", f"{head} downloads without a `sha256sum -c` check"))
        if (pip := _pip_install(cmd)) is not None and (why := check_pip(pip, stage, env)):
            problems.append(("pip-lock", why))
        if why := check_git(cmd, env):
            problems.append(("git-sha", why))
        if head == "apt-get" and "install" in cmd and not _snapshot_active(script, env):
            words = [_expand(w, env) for w in cmd[cmd.index("install") + 1:] if not w.startswith("-")]
            # Package lists passed through a variable: every *APT_PACKAGES build arg the RUN references.
            words += [env.get(v, "") for v in set(VAR.findall(script)) if v.endswith("APT_PACKAGES")]
            loose = list(dict.fromkeys(p for p in " ".join(words).split() if "=" not in p and not p.startswith("$")))
            if loose:
                problems.append(("apt-pin", f"apt-get install {' '.join(loose)}: no =version and no --snapshot"))
    return problems


def _is_root(user: str) -> bool:
    return user.split(":", 1)[0] in ("root", "0")


def check_dockerfile(path: Path, build_args: dict[str, str] | None = None) -> list[Violation]:
    """Violations of the pin policy in one Dockerfile, given the build args a build would pass."""
    path = Path(path)
    build_args = build_args or {}
    out: list[Violation] = []

    def bad(ins: Instruction, rule: str, msg: str) -> None:
        out.append(Violation(str(path), ins.line, rule, msg))

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions(path.read_text()):
        stage = stages[-1] if stages else None
        env = {**global_args, **(stage.args if stage else {})}
        if ins.keyword == "ARG":
            name, eq, default = ins.args.partition("=")
            name = name.strip()
            value = build_args.get(name, _expand(default.strip().strip('"'), global_args) if eq else "")
            if stage is None:
                global_args[name] = value
            else:
                stage.args[name] = build_args.get(name, value if eq else global_args.get(name, ""))
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            ref = _expand(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            if ref not in {s.name for s in stages} and not DIGEST_REF.search(ref):
                bad(ins, "base-digest", f"FROM {words[0]} (= {ref or 'empty'}) is not pinned by @sha256 digest")
            stages.append(Stage(name))
        elif ins.keyword == "COPY" and stage is not None:
            words = [w for w in ins.args.split() if not w.startswith("--")]
            srcs, dest = words[:-1], _expand(words[-1], env) if words else ""
            for s in srcs:
                s = _expand(s, env)
                if re.fullmatch(r"pinned/[^/]+\.txt", s):
                    stage.copied_locks.add(dest if not dest.endswith("/") else dest + Path(s).name)
        elif ins.keyword == "ADD" and re.search(r"(^|\s)(https?|git)://|\.git(\s|$)", ins.args):
            bad(ins, "download-hash", "ADD fetches from the network; download and sha256-check in a RUN instead")
        elif ins.keyword == "RUN" and stage is not None:
            for rule, msg in check_run(ins.args, stage, env):
                bad(ins, rule, msg)
        elif ins.keyword == "USER" and stage is not None:
            stage.user = _expand(ins.args.strip(), env)
    if stages and (stages[-1].user is None or _is_root(stages[-1].user)):
        out.append(Violation(str(path), 0, "non-root", "the final stage does not set USER to a non-root user"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtpquant.pins.policy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dockerfiles", nargs="+", type=Path)
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    build_args = dict(a.split("=", 1) for a in args.build_arg)
    violations = [v for f in args.dockerfiles for v in check_dockerfile(f, build_args)]
    for v in violations:
        print(v)
    print(f"{len(args.dockerfiles)} Dockerfile(s), {len(violations)} violation(s)", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
