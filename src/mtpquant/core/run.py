"""The run directory: the one place that names what is in it, and the one writer of its stage records.

    RUN/base/                  prepare      the BF16 source checkpoint (fixture, local path or pinned hub commit)
    RUN/quantized/             quantize     llm-compressor output (MTP layer absent)
    RUN/artifact/              inject-mtp   quantized + MTP layer(s) in BF16; manifest.json from `manifest`
    RUN/<stage>.json           the record of prepare, quantize, inject-mtp, verify and serve
    RUN/<stage>.log            the libraries' log of quantize (GPTQ metrics, known notices; see mtpquant.core.quiet)
    RUN/serve-bf16-<artifact>/ the dequantized copy that a `dequantize` serve profile loads
    RUN/serve-<name>-<mtp|nomtp>.log, RUN/serve-<label>.log   server logs of serve and eval
    RUN/eval/<label>.json      eval
    RUN/bench/                 bench: bench.json, bench.md, bench.png, <mtp|nomtp>-c<N>-r<R>.json,
                               serve-<mtp|nomtp>.log, client.log (the benchmark client's own output)
    RUN/report.md              report

Stages take explicit paths and return their record; whoever runs a stage writes it once with `Run.record`.
A record may carry a `resume` entry (the stage's inputs and the size and mtime of every file it wrote): a re-run
of the chain after an interruption skips each stage whose inputs are unchanged and whose outputs are as written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_write_json
from mtpquant.core.checkpoint import read_json

STAGES = ("prepare", "quantize", "inject-mtp", "verify")  # the stages that build an artifact, in order
RECORDS = (*STAGES, "serve")
MANIFEST = "manifest.json"


def manifest_of(artifact: Path) -> Path:
    """An artifact's manifest: inside the artifact, which `--artifact` may put outside the run."""
    return Path(artifact) / MANIFEST


def signature(*paths: Path) -> dict[str, list[int]]:
    """Size and mtime of every file under `paths` (links followed): what a stage read or wrote, cheap to take
    again. Outputs are written once and renamed into place, so any later change to one shows here. An artifact's
    manifest is left out: `manifest` adds it to the artifact after the stages that wrote and read it."""
    out: dict[str, list[int]] = {}
    for top in map(Path, paths):
        if top.is_file():
            st = top.stat()
            out[str(top)] = [st.st_size, st.st_mtime_ns]
            continue
        for d, _, files in os.walk(top, followlinks=True):
            for f in files:
                if f == MANIFEST:
                    continue
                st = (Path(d) / f).stat()
                out[str(Path(d) / f)] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(out.items()))


def code_sha256() -> str:
    """The package's own source: a changed stage is a changed input."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parents[1].rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def load_json(path: Path) -> Any:
    """A JSON file's content, None when there is no such file."""
    return read_json(path) if Path(path).is_file() else None


@dataclass(frozen=True)
class Run:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def quantized(self) -> Path:
        return self.root / "quantized"

    @property
    def artifact(self) -> Path:
        return self.root / "artifact"

    def record_path(self, stage: str) -> Path:
        if stage not in RECORDS:
            raise ValueError(f"no record for stage {stage!r} (records: {', '.join(RECORDS)})")
        return self.root / f"{stage}.json"

    def record(self, stage: str, data: dict[str, Any]) -> Path:
        path = self.record_path(stage)
        atomic_write_json(path, data)
        return path

    def read_record(self, stage: str) -> dict[str, Any] | None:
        return load_json(self.record_path(stage))

    @staticmethod
    def resume_entry(inputs: dict[str, Any], outputs: list[Path]) -> dict[str, Any]:
        """What `done` compares on the next run: `inputs` and the signature of the files written."""
        return {"inputs": _plain(inputs), "outputs": [str(p) for p in outputs], "written": signature(*outputs)}

    def done(self, stage: str, inputs: dict[str, Any]) -> bool:
        """The stage's record exists with these inputs, and every file it wrote is still as it wrote it."""
        resume = (self.read_record(stage) or {}).get("resume")
        if not isinstance(resume, dict) or resume.get("inputs") != _plain(inputs):
            return False
        outputs = [Path(p) for p in resume.get("outputs", [])]
        return all(p.exists() for p in outputs) and resume.get("written") == signature(*outputs)

    def stage_log(self, stage: str) -> Path:
        """The libraries' full log of a stage (what the terminal is spared: GPTQ metrics, known notices)."""
        return self.root / f"{stage}.log"

    def serve_copy(self, artifact: Path) -> Path:
        return self.root / f"serve-bf16-{Path(artifact).name}"

    def serve_log(self, served_name: str, mtp: bool) -> Path:
        return self.root / f"serve-{served_name}-{'mtp' if mtp else 'nomtp'}.log"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_result(self, label: str) -> Path:
        return self.eval_dir / f"{label}.json"

    def eval_results(self) -> list[Path]:
        return sorted(self.eval_dir.glob("*.json"))

    def eval_log(self, label: str) -> Path:
        return self.root / f"serve-{label}.log"

    @property
    def bench_dir(self) -> Path:
        return self.root / "bench"

    @property
    def bench_summary(self) -> Path:
        return self.bench_dir / "bench.json"

    @property
    def bench_table(self) -> Path:
        return self.bench_dir / "bench.md"

    @property
    def bench_plot(self) -> Path:
        return self.bench_dir / "bench.png"

    def bench_point(self, tag: str, concurrency: int, repeat: int) -> Path:
        return self.bench_dir / f"{tag}-c{concurrency}-r{repeat}.json"

    @property
    def bench_client_log(self) -> Path:
        return self.bench_dir / "client.log"

    def bench_log(self, tag: str) -> Path:
        return self.bench_dir / f"serve-{tag}.log"

    @property
    def report(self) -> Path:
        return self.root / "report.md"
