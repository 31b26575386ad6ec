"""A heartbeat for `make test`: `pytest -q` prints one dot per test, and some tests run for minutes (a vLLM
server starting, real GPTQ). When one test has run HEARTBEAT_S, a line says which and for how long, again every
HEARTBEAT_S until it ends, so the terminal is never silent longer than that.

The line goes to a copy of the terminal's file descriptor taken when pytest is configured (output capture is
suspended then): while a test runs, pytest's fd capture points fd 1 and 2 at its temporary files, so an ordinary
write from the heartbeat thread would land in the test's captured output instead of the terminal.
`MTPQUANT_TEST_HEARTBEAT_S=0` turns it off.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

HEARTBEAT_S = float(os.environ.get("MTPQUANT_TEST_HEARTBEAT_S", "5"))


class Heartbeat:
    """Which test runs since when; `tick(now)` is the line to print, or None when none is due."""

    def __init__(self, every_s: float = HEARTBEAT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self.lock = threading.Lock()
        self.test: str | None = None
        self.started = self.last = 0.0
        self.said = 0  # lines said for the running test: the first one ends the line of dots

    def begin(self, nodeid: str) -> None:
        with self.lock:
            self.test, self.started = nodeid, self.clock()
            self.last = self.started  # the dot of the test before was the last output
            self.said = 0

    def end(self) -> None:
        with self.lock:
            self.test = None

    def tick(self, now: float | None = None) -> str | None:
        """The text to write (its own line; the first of a test also ends pytest's line of dots), or None."""
        now = self.clock() if now is None else now
        with self.lock:
            if self.test is None or now - self.last < self.every_s:
                return None
            self.last = now
            self.said += 1
            first = "\n" if self.said == 1 else ""
            return f"{first}  ... {self.test} still running ({now - self.started:.0f} s)\n"


class Beater:
    """The thread that writes Heartbeat's lines to `fd` (a dup of the terminal's)."""

    def __init__(self, heartbeat: Heartbeat, fd: int, poll_s: float = 0.5) -> None:
        self.heartbeat, self.fd, self.poll_s = heartbeat, fd, poll_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.poll_s):
            line = self.heartbeat.tick()
            if line:
                try:
                    os.write(self.fd, line.encode())
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        os.close(self.fd)
