"""Rich progress on stderr for every wait longer than a few seconds (transient, so logs stay readable).

`byte_progress`: copying and hashing multi-GB layers. `progress`: anything else, counted (requests, points) or
not (a server starting): elapsed time, done of total where there is one, and a status line (what it is doing,
e.g. the server's last log line).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
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


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """Yield `update(advance=0, status=None)`: a spinner, the description, done/total and a bar when `total` is
    given, the elapsed time and the latest status line."""
    columns: list[Any] = [SpinnerColumn(), TextColumn(f"[bold]{description}[/]")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[status]}", markup=False)]
    bar = Progress(*columns, console=Console(stderr=True), transient=True)
    task = bar.add_task(description, total=total, status="")

    def update(advance: int = 0, status: str | None = None) -> None:
        bar.update(task, advance=advance, **({"status": short(status)} if status is not None else {}))

    with bar:
        yield update
