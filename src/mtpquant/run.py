"""The run directory: the one place that names what is in it, and the one writer of its stage records.

    RUN/base/                  prepare      the BF16 source checkpoint (fixture, local path or pinned hub commit)
    RUN/quantized/             quantize     llm-compressor output (MTP layer absent)
    RUN/artifact/              inject-mtp   quantized + MTP layer(s) in BF16; manifest.json from `manifest`
    RUN/<stage>.json           the record of prepare, quantize, inject-mtp, verify and serve
    RUN/serve-bf16-<artifact>/ the dequantized copy that a `dequantize` serve profile loads
    RUN/serve-<name>-<mtp|nomtp>.log, RUN/serve-<label>.log   server logs of serve and eval
    RUN/eval/<label>.json      eval
    RUN/bench/                 bench: bench.json, bench.md, bench.png, <mtp|nomtp>-c<N>-r<R>.json, serve-<mtp|nomtp>.log
    RUN/report.md              report

Stages take explicit paths and return their record; whoever runs a stage writes it once with `Run.record`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtpquant.atomic import atomic_write_json
from mtpquant.checkpoint import read_json

STAGES = ("prepare", "quantize", "inject-mtp", "verify")  # the stages that build an artifact, in order
RECORDS = (*STAGES, "serve")
MANIFEST = "manifest.json"


def manifest_of(artifact: Path) -> Path:
    """An artifact's manifest: inside the artifact, which `--artifact` may put outside the run."""
    return Path(artifact) / MANIFEST


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

    def bench_log(self, tag: str) -> Path:
        return self.bench_dir / f"serve-{tag}.log"

    @property
    def report(self) -> Path:
        return self.root / "report.md"
