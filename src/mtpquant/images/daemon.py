"""The connection to the Docker engine (the Docker SDK, imported only here and when used)."""

from __future__ import annotations

from mtpquant.core.errors import MtpquantError


def client():
    try:
        import docker

        c = docker.from_env(timeout=600)
        c.ping()
        return c
    except Exception as e:  # the SDK's errors vary by transport: report one line
        raise MtpquantError(f"no Docker engine reachable ({type(e).__name__}: {e}); start dockerd "
                            "(see .ci/docker-setup) or use --runtime local") from None
