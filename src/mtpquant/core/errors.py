"""User-facing errors: one line, naming the file, field or tensor, and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable


class MtpquantError(Exception):
    """A problem with the user's input or environment; printed as one line, exit code 2."""

    exit_code = 2


class VerificationFailed(MtpquantError):
    """The artifact is not what it claims to be; exit code 3."""

    exit_code = 3


def printable(text: str) -> str:
    """`text` on one line: a name taken from a hostile file (a tensor called "\\n") is shown escaped, so a newline
    or terminal control character in it can neither split a message nor drive the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def one_line(exc: BaseException) -> str:
    return printable(str(exc))


def run_command(body: Callable[[], int], *user_errors: type[Exception]) -> int:
    """A small module's `main`: a user-facing error (MtpquantError or one of `user_errors`) is one line on stderr
    and its exit code (2 unless the error says otherwise), never a traceback."""
    try:
        return body()
    except (MtpquantError, *user_errors) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
