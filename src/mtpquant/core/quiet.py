"""Known, harmless library noise kept out of the terminal: it goes to the stage's log file, or is said once in
one line that cannot be mistaken for the MTP layer being lost.

- `stdout_to(log)`: an in-process library that prints its own report (vLLM's benchmark client: the argparse
  `Namespace(...)` dump, the "install termplotlib" tip, its result table) writes into `log` instead (file
  descriptor 1 too, for what vLLM's logging handler holds); stderr, where the progress display is, stays.
- `stage_logs(log, ...)`: llm-compressor's and compressed-tensors' loguru records (the per-Linear `GPTQ | METRIC`
  lines, "No accelerator available!", "Could not find MTP weights with prefix mtp") and transformers' LOAD
  REPORT when it lists only the MTP layer's tensors as UNEXPECTED go to the stage log in full; the terminal
  gets one line for each ("N MTP tensors not loaded by transformers (expected: inject-mtp copies them back)").
  What llm-compressor prints while it is imported (its own loguru sink on stdout: "No accelerator available!")
  and the known Python warnings of a CPU run (KNOWN_WARNINGS) and torch's fx-tracing notice (KNOWN_LOGGERS) go
  to the stage log too. A load report naming
  anything else, and every other warning, still reaches the terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def mtp_only_load_report(message: str, prefixes: tuple[str, ...]) -> bool:
    """True for transformers' LOAD REPORT when every row is an UNEXPECTED key of an MTP layer: what
    `from_pretrained` always says of a GLM checkpoint (its model class has no MTP layer; inject-mtp copies it)."""
    text = _ANSI.sub("", message)
    if "LOAD REPORT" not in text or not prefixes:
        return False
    rows = [line.split(" | ") for line in text.splitlines() if " | " in line]
    rows = [[c.strip() for c in r] for r in rows if r[0].strip() != "Key"]
    return bool(rows) and all(len(r) > 1 and r[1] == "UNEXPECTED" and _is_mtp(r[0], prefixes) for r in rows)


def _is_mtp(key: str, prefixes: tuple[str, ...]) -> bool:
    start = key.split("...")[0]  # a narrow terminal's compact table cuts the middle of long keys: one cut
    return any(start.startswith(p) for p in prefixes)  # before the layer index could be any layer, so it is shown


@dataclass
class Noise:
    """What was kept out of the terminal, to be said once."""

    mtp_load_reports: int = 0
    mtp_prefix_warnings: int = 0
    dropped: Counter = field(default_factory=Counter)


class LoadReportFilter(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...], noise: Noise) -> None:
        super().__init__()
        self.prefixes, self.noise = prefixes, noise

    def filter(self, record: logging.LogRecord) -> bool:
        if mtp_only_load_report(record.getMessage(), self.prefixes):
            self.noise.mtp_load_reports += 1
            return False
        return True


KNOWN = ("No accelerator available",  # CPU-only notices of compressed-tensors/llm-compressor
         "MoE is being linearized after loading",  # quantize linearizes on purpose (the experts' 2-D layout)
         "Disabling tokenizer parallelism")  # oneshot sets TOKENIZERS_PARALLELISM=false itself and says so
# Python loggers whose records go to the stage log alone: torch's once-per-process notice that is_fx_tracing (which
# llm-compressor's sequential tracer calls) is true under torch.export too (a deprecation note, not our problem)
KNOWN_LOGGERS = ("torch.fx._symbolic_trace",)
# Python warnings of a tiny CPU run: llm-compressor offloads modules while saving (nothing to do with the MTP layer)
KNOWN_WARNINGS = ("Attempting to save a model with offloaded modules",)


class _Counted(logging.Filter):
    """Counts the records of a KNOWN_LOGGERS logger (they go to the stage log only)."""

    def __init__(self, noise: Noise) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        self.noise.dropped[record.name] += 1
        return True


def terminal_filter(noise: Noise) -> Callable[[dict[str, Any]], bool]:
    """loguru records (llm-compressor, compressed-tensors) for the terminal: warnings and worse, less the
    per-Linear GPTQ METRIC lines, the CPU-only notices and the MTP-prefix warning (all in the stage log)."""
    def keep(record: dict[str, Any]) -> bool:
        msg, level = str(record["message"]), record["level"]
        if "Could not find MTP weights with prefix" in msg:
            noise.mtp_prefix_warnings += 1
            return False
        if level.name == "METRIC" or any(k in msg for k in KNOWN):
            noise.dropped[level.name] += 1
            return False
        return level.no >= logging.WARNING

    return keep


def explain(noise: Noise, n_mtp: int, log: Path) -> list[str]:
    """One line per kind of noise that was kept out of the terminal."""
    out = []
    if noise.mtp_load_reports:
        out.append(f"{n_mtp} MTP tensors not loaded by transformers (expected: inject-mtp copies them back)")
    if noise.mtp_prefix_warnings:
        out.append("llm-compressor saved no MTP weights (expected: its model has no MTP layer; inject-mtp copies "
                   "them from the base)")
    if noise.dropped or noise.mtp_load_reports or noise.mtp_prefix_warnings:
        out.append(f"library log (GPTQ metrics, CPU-only notices, load report, torch notices): {log}")
    return out


@contextlib.contextmanager
def stage_logs(log: Path, mtp_prefixes: list[str], n_mtp: int, say: Callable[[str], None]) -> Iterator[Noise]:
    """Library logs of a stage into `log` in full; the terminal keeps what is news (see terminal_filter and
    LoadReportFilter), then one line per kind of known noise."""
    import transformers  # its logging root, configured on import
    from loguru import logger

    from mtpquant.core.progress import progress

    imported = io.StringIO()  # what llm-compressor says while imported goes to the log, not the terminal
    # the redirect inside the spinner: rich's live display would pass stdout on to the terminal
    with contextlib.suppress(ImportError), progress("loading llm-compressor"), contextlib.redirect_stdout(imported):
        import llmcompressor  # noqa: F401  (configures loguru on import: replace that configuration after it)
    noise = Noise()
    show = warnings.showwarning

    def known_to_log(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                     line: str | None = None) -> None:
        if not any(k in str(message) for k in KNOWN_WARNINGS):
            return show(message, category, filename, lineno, file, line)
        noise.dropped["warning"] += 1
        with open(log, "a") as f:
            f.write(warnings.formatwarning(message, category, filename, lineno, line))
        return None

    warnings.showwarning = known_to_log
    root = transformers.utils.logging._get_library_root_logger()
    # delay: a stage refused before any library logs writes no file (a user mistake leaves nothing behind)
    file_handler = logging.FileHandler(log, delay=True)
    report_filter = LoadReportFilter(tuple(mtp_prefixes), noise)
    root.addHandler(file_handler)
    for h in root.handlers:
        if h is not file_handler:
            h.addFilter(report_filter)
    known_loggers = {name: logging.getLogger(name) for name in KNOWN_LOGGERS}
    saved_propagate = {name: lg.propagate for name, lg in known_loggers.items()}
    counted = _Counted(noise)
    for lg in known_loggers.values():
        lg.addHandler(file_handler)
        lg.addFilter(counted)
        lg.propagate = False  # torch's own handler (on the "torch" logger) would print it
    logger.remove()
    sinks = [logger.add(str(log), level=0, delay=True), logger.add(sys.stderr, level=0, filter=terminal_filter(noise))]
    ok = False
    try:
        yield noise
        ok = True
    finally:
        warnings.showwarning = show
        for s in sinks:
            logger.remove(s)
        logger.add(sys.stderr, level="WARNING")
        root.removeHandler(file_handler)
        for name, lg in known_loggers.items():
            lg.removeHandler(file_handler)
            lg.removeFilter(counted)
            lg.propagate = saved_propagate[name]
        file_handler.close()
        for h in root.handlers:
            h.removeFilter(report_filter)
        # a refused stage (a user mistake) leaves no log and no note: its one-line error is all the terminal gets
        if ok and imported.getvalue().strip():
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write("(printed while llm-compressor was imported)\n" + imported.getvalue())
            noise.dropped["import"] += 1
        for line in explain(noise, n_mtp, log) if ok else []:
            say(line)
