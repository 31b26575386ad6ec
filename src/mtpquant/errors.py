"""User-facing errors: one line, naming the file, field or tensor, and a non-zero exit."""


class MtpquantError(Exception):
    """A problem with the user's input or environment; printed as one line, exit code 2."""

    exit_code = 2


class VerificationFailed(MtpquantError):
    """The artifact is not what it claims to be; exit code 3."""

    exit_code = 3
