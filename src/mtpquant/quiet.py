"""Known, harmless library noise kept out of the terminal: it goes to the stage's log file, or is said once in
one line that cannot be mistaken for the MTP layer being lost.

- `stdout_to(log)`: an in-process library that prints its own report (vLLM's benchmark client: the argparse
  `Namespace(...)` dump, the "install termplotlib" tip, its result table) writes into `log` instead (file
  descriptor 1 too, for what vLLM's logging handler holds); stderr, where the progress display is, stays.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def stdout_to(log: Path) -> Iterator[None]:
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    saved = os.dup(1)
    with open(log, "ab") as f:  # noqa: SIM117 (the fd must outlive redirect_stdout's text wrapper)
        os.dup2(f.fileno(), 1)
        try:
            with open(1, "w", closefd=False) as text, contextlib.redirect_stdout(text):
                yield
                text.flush()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
