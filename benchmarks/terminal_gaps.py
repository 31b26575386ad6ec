"""What a user sees in the terminal while a command runs: record it with timestamps, then report silent gaps.

    python benchmarks/terminal_gaps.py record --log runs/demo.tslog -- make demo
    python benchmarks/terminal_gaps.py report runs/demo.tslog --json benchmarks/results/x.json  (or a .tslog.gz)

`record` runs the command under a pseudo-terminal (so rich draws its spinners and live displays exactly as a user
sees them), passes every byte through, and writes one JSON line per chunk read: `{"t": seconds since start, "d":
text}`; every 30 s it also records the machine's load average (`{"t": ..., "load": [1, 5, 15 min]}`). `report`
counts a gap wherever no byte reached the terminal for longer than `--gap` seconds (a spinner redraw counts as
output: it shows the wait's name and elapsed time), and names the last text line before each gap; it also counts
'Traceback' lines and says whether the last screen is the `mtpquant summary` panel. Standard library + rich only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]")
SUMMARY_TITLE = "mtpquant summary"
LOAD_EVERY_S = 30.0


def record(log: Path, cmd: list[str], columns: int = 120, rows: int = 40) -> int:
    """Run `cmd` under a pty; tee its output to our stdout and to `log` with timestamps. Returns its exit code."""
    master, slave = pty.openpty()
    try:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    except OSError:
        pass
    env = {**os.environ, "COLUMNS": str(columns), "LINES": str(rows)}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    t0 = time.monotonic()
    next_load = 0.0
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write(json.dumps({"t": 0.0, "cmd": cmd, "start": time.time()}) + "\n")
        while True:
            now = time.monotonic() - t0
            if now >= next_load:
                out.write(json.dumps({"t": round(now, 3), "load": list(os.getloadavg())}) + "\n")
                out.flush()
                next_load = now + LOAD_EVERY_S
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child side closed
                break
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            out.write(json.dumps({"t": round(time.monotonic() - t0, 3), "d": chunk.decode("utf-8", "replace")}) + "\n")
        rc = proc.wait()
        out.write(json.dumps({"t": round(time.monotonic() - t0, 3), "rc": rc, "end": time.time()}) + "\n")
    os.close(master)
    return rc


def _lines(text: str) -> list[str]:
    """Visible text lines of a chunk: ANSI codes removed, split on newlines and carriage returns."""
    return [s.strip() for s in re.split(r"[\r\n]+", ANSI.sub("", text)) if s.strip()]


def analyse(log: Path, gap_s: float = 10.0, tail_lines: int = 60) -> dict:
    """Read a `record` log: total time, silent gaps, tracebacks, load, and whether the summary panel ends it."""
    text = gzip.decompress(log.read_bytes()).decode() if log.suffix == ".gz" else log.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    chunks = [e for e in events if "d" in e]
    loads = [e["load"] for e in events if "load" in e]
    end = next((e for e in events if "rc" in e), None)
    total = end["t"] if end else (events[-1]["t"] if events else 0.0)
    gaps, last_line, prev_t = [], "(start)", 0.0
    lines_seen: list[str] = []
    tracebacks = 0
    for c in chunks:
        if c["t"] - prev_t > gap_s:
            gaps.append({"at_s": round(prev_t, 1), "silent_s": round(c["t"] - prev_t, 1), "after": last_line[:160]})
        lines = _lines(c["d"])
        tracebacks += sum(1 for s in lines if s.startswith("Traceback"))
        if lines:
            last_line = lines[-1]
            lines_seen.extend(lines)
        prev_t = c["t"]
    if end and end["t"] - prev_t > gap_s:
        gaps.append({"at_s": round(prev_t, 1), "silent_s": round(end["t"] - prev_t, 1), "after": last_line[:160]})
    tail = lines_seen[-tail_lines:]
    title_at = max((i for i, s in enumerate(tail) if SUMMARY_TITLE in s), default=None)
    # The panel is the last screen when its title is in the tail and only the panel body and its closing border,
    # plus at most a few short lines (nox's "Session demo was successful"), follow it.
    after_panel = tail[title_at + 1 :] if title_at is not None else []
    closing = max((i for i, s in enumerate(after_panel) if s.startswith("╰")), default=None)
    trailing = after_panel[closing + 1 :] if closing is not None else after_panel
    summary_last = title_at is not None and closing is not None and len(trailing) <= 3
    load_all = [x[0] for x in loads]
    load = ({"min": round(min(load_all), 2), "max": round(max(load_all), 2),
             "mean": round(sum(load_all) / len(load_all), 2)} if load_all else None)
    return {
        "log": str(log),
        "command": events[0].get("cmd") if events else None,
        "rc": end["rc"] if end else None,
        "total_s": round(total, 1),
        "gap_threshold_s": gap_s,
        "n_gaps": len(gaps),
        "gaps": sorted(gaps, key=lambda g: -g["silent_s"]),
        "tracebacks": tracebacks,
        "summary_is_last_screen": summary_last,
        "after_summary": trailing,
        "load_1min": load,
        "lines": len(lines_seen),
    }


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    load = result["load_1min"] or {}
    console.print(
        f"[bold]{' '.join(result['command'] or [])}[/]: rc {result['rc']}, {result['total_s']:.0f} s "
        f"({result['total_s'] / 60:.1f} min), {result['lines']} lines, load {load.get('min')}-{load.get('max')} "
        f"(mean {load.get('mean')}); tracebacks {result['tracebacks']}; summary is the last screen: "
        f"{result['summary_is_last_screen']}"
    )
    table = Table(title=f"{result['n_gaps']} silent gaps > {result['gap_threshold_s']:g} s")
    table.add_column("at (s)", justify="right")
    table.add_column("silent (s)", justify="right")
    table.add_column("last line before it")
    for g in result["gaps"]:
        table.add_row(f"{g['at_s']:.0f}", f"{g['silent_s']:.1f}", g["after"])
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    rec = sub.add_parser("record", help="run a command under a pty, timestamping its output")
    rec.add_argument("--log", type=Path, required=True)
    rec.add_argument("cmd", nargs=argparse.REMAINDER)
    rep = sub.add_parser("report", help="silent gaps, tracebacks and the last screen of a recorded log")
    rep.add_argument("log", type=Path)
    rep.add_argument("--gap", type=float, default=10.0)
    rep.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.what == "record":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return record(args.log, cmd)
    result = analyse(args.log, args.gap)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
