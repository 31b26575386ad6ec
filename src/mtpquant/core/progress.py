"""Rich progress on stderr for every wait longer than a few seconds (transient, so logs stay readable).

`byte_progress`: copying and hashing multi-GB layers. `progress`: anything else, counted (requests, points) or
not (a server starting): elapsed time, done of total where there is one, and a status line (what it is doing,
e.g. the server's last log line).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

STATUS_CHARS = 100  # a status line longer than this is cut (vLLM's log lines run to hundreds of characters)


@contextlib.contextmanager
def byte_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(nbytes)`; draws a bar on stderr."""
    progress = Progress(TextColumn(f"[bold]{description}[/]"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = progress.add_task(description, total=total)
    with progress:
        yield lambda n: progress.advance(task, n)


def short(line: str, limit: int = STATUS_CHARS) -> str:
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


_active: list[Progress] = []  # the live progress display, when one is up: nested waits add a line to it


def _display() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}[/]"), BarColumn(),
                    TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}", markup=False), console=Console(stderr=True), transient=True)


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """Yield `update(advance=0, status=None)`: a spinner, the description, a bar and done/total when `total` is
    given, the elapsed time and the latest status line. Inside another `progress` (a server starting between
    bench points) it is one more line of the same display, removed when done."""
    outer = bool(_active)
    bar = _active[0] if outer else _display()
    task = bar.add_task(description, total=total, status="", count="" if total is None else f"0/{total}")
    done = 0

    def update(advance: int = 0, status: str | None = None) -> None:
        nonlocal done
        done += advance
        fields = {"count": f"{done}/{total}"} if total is not None else {}
        bar.update(task, advance=advance, **fields, **({"status": short(status)} if status is not None else {}))

    if outer:
        try:
            yield update
        finally:
            bar.remove_task(task)
        return
    _active.append(bar)
    try:
        with bar:
            yield update
    finally:
        _active.clear()


def loading(stage: str, *modules: str) -> None:
    """Import `modules` (torch, transformers: 5 s idle, a minute on a busy machine) under a spinner that says so,
    so a stage's start is never a silent wait. Already imported: nothing is shown."""
    import importlib
    import sys

    todo = [m for m in modules if m not in sys.modules]
    if todo:
        with progress(f"{stage}: loading {', '.join(todo)}"):
            for m in todo:
                importlib.import_module(m)
