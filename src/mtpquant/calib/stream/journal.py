"""The resume journal of `quantize --engine stream`: the work dir, the inputs' fingerprint, the finished layers
(each only once its files are durable), and the tests' kill points.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_write_json
from mtpquant.core.checkpoint import INDEX_NAME, Checkpoint, file_sha256
from mtpquant.core.errors import MtpquantError
from mtpquant.model import recipes

ENGINE_VERSION = "stream-4"  # 2: deterministic algorithms on the GPU (outputs there changed); 3: activations


# files in safetensors layout (streamed, not torch.save), none after the last layer (the artifact is unchanged);
# 4: layer 0's inputs come from a forward on the GPU (rotary tables computed there: outputs there may change;
# on the H200 benchmark checkpoint every file's sha256 stayed that of stream-3)
JOURNAL = "journal.json"


PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "safetensors")


def work_dir_for(out_dir: Path) -> Path:
    return Path(out_dir).with_name(Path(out_dir).name + ".work")


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(source: Checkpoint, qpath: Path, cpath: Path, token_ids_sha256: str) -> dict[str, str]:
    """Everything the output depends on; a resume is refused when any of it changed."""
    from importlib.metadata import version

    index = source.index_path if source.index_path.exists() else source.root / "model.safetensors"
    fp = {
        "source_index": file_sha256(index) if index.name == INDEX_NAME else
        sha256_bytes(json.dumps(source.index, sort_keys=True).encode()),
        "source_config": file_sha256(source.root / "config.json"),
        "recipe": recipes.recipe_sha256("quant", qpath),
        "calibration": recipes.recipe_sha256("calibration", cpath),
        "token_ids": token_ids_sha256,
        "engine": ENGINE_VERSION,
    }
    for pkg in PACKAGES:
        fp[f"version:{pkg}"] = version(pkg)
    return fp


class Journal:
    """`journal.json` in the work dir: the fingerprint and the finished layers, rewritten atomically."""

    def __init__(self, work: Path, fp: dict[str, str], restart: bool):
        self.work = work
        self.discard: Callable[[Path], Any] = Journal.unlink  # how a no longer needed boundary is deleted
        self.path = work / JOURNAL
        if restart and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        self.layers: list[dict[str, Any]] = []
        if self.path.exists():
            old = json.loads(self.path.read_text())
            changed = [k for k in sorted(set(fp) | set(old["fingerprint"]))
                       if fp.get(k) != old["fingerprint"].get(k)]
            if changed:
                raise MtpquantError(
                    f"quantize --engine stream: cannot resume {work}: {', '.join(changed)} changed since it "
                    "started; re-run with --restart to start over")
            for entry in old["layers"]:  # a layer whose shard is gone or differs is not finished
                if not _intact(work, entry["shard"], entry["shard_sha256"]):
                    break
                self.layers.append(entry)
            # resuming needs the activations after the last finished layer (earlier ones are deleted as the
            # run goes): without them intact, back off to an earlier boundary, down to a fresh start
            # (the model's last layer has none: nothing comes after it)
            while self.layers and self.layers[-1]["activations"] is not None and not _intact(
                    work, self.layers[-1]["activations"], self.layers[-1]["activations_sha256"]):
                self.layers.pop()
        self.fp = fp
        self._write()

    @staticmethod
    def unlink(path: Path) -> None:
        path.unlink(missing_ok=True)

    def _write(self) -> None:
        atomic_write_json(self.path, {"engine": ENGINE_VERSION, "fingerprint": self.fp, "layers": self.layers})

    def finish(self, entry: dict[str, Any]) -> None:
        self.layers.append(entry)
        self._write()
        kill_point("after", entry["layer"])

    def absorb(self) -> int:
        """Journals, in layer order, each layer whose owner rank has written its entry file (which it does only
        once the layer's shard and activations are durable); stops at the first layer not there yet. The
        activations of the layer before are then no longer needed to resume. Rank 0 alone calls this."""
        added = 0
        while (path := self.work / entry_name(len(self.layers))).is_file():
            prev = self.layers[-1]["activations"] if self.layers else None
            self.finish(json.loads(path.read_text()))
            if prev:
                self.discard(self.work / prev)
            added += 1
        return added

    def drop_stale_entries(self) -> None:
        """Entry files past the journal (left by a killed run) are not taken: those layers run again. Boundaries
        other than the one resume reads are deleted: the old ones' unlinks run on a release thread, so a
        process killed right after a journal entry can leave one behind (GBs each)."""
        for path in self.work.glob("layer-*.json"):
            if int(path.stem.removeprefix("layer-")) >= len(self.layers):
                path.unlink()
        keep = self.layers[-1]["activations"] if self.layers else None
        for path in self.work.glob("activations-after-*.safetensors"):
            if path.name != keep:
                path.unlink()


def entry_name(i: int) -> str:
    """Layer i's entry file in the work dir, written by its owner rank after its files are durable."""
    return f"layer-{i:05d}.json"


def _journal_layers(path: Path) -> int | None:
    return len(json.loads(path.read_text())["layers"]) if path.is_file() else None


def open_journal(work: Path, fp: dict[str, str], restart: bool, split: Any) -> tuple[Journal | None, int]:
    """Rank 0 opens the journal (refusing changed inputs, as one process does); then every rank checks that it
    has the inputs rank 0 has and sees the journal rank 0 wrote, else every rank refuses with the same line
    (a rank that refused alone would leave the others waiting). Returns (the journal on rank 0, else None;
    the first layer to run)."""
    from mtpquant.calib import ranks

    journal, status = None, {}
    if split.rank == 0:
        try:
            journal = Journal(work, fp, restart)
            journal.drop_stale_entries()
            status = {"start": len(journal.layers)}
        except MtpquantError as e:
            status = {"error": str(e)}
    status = ranks.share(status, ranks.control())
    if "error" in status:
        raise MtpquantError(status["error"])
    start = status["start"]
    views = ranks.gather({"fingerprint": fp, "journal_layers": _journal_layers(work / JOURNAL)}, ranks.control())
    first = views[0]["fingerprint"]
    for r, view in enumerate(views):
        changed = sorted(k for k in set(first) | set(view["fingerprint"]) if view["fingerprint"].get(k) != first.get(k))
        if changed:
            raise MtpquantError(f"quantize --engine stream: rank {r}'s inputs differ from rank 0's "
                                f"({', '.join(changed)}): every rank must run the same command on the same files")
        if view["journal_layers"] != start:
            seen = "no journal" if view["journal_layers"] is None else f"{view['journal_layers']} finished layers"
            raise MtpquantError(f"quantize --engine stream: rank {r} sees {seen} in {work / JOURNAL}, rank 0 sees "
                                f"{start}: every rank must see one work dir (on several nodes, a shared filesystem)")
    return journal, start


def _intact(work: Path, name: str, sha256: str) -> bool:
    return (work / name).is_file() and file_sha256(work / name) == sha256


def kill_point(phase: str, layer: int) -> None:
    """Tests: MTPQUANT_STREAM_KILL=PHASE:LAYER SIGKILLs this process there ("read": half of the layer's bytes
    read; "calibrate": half of the calibration batches through the layer with the Hessian hooks on (a dense
    layer: before its propagation pass); "write": layer's shard written to its temp file, not yet renamed;
    "after": right after the layer's journal entry)."""
    if os.environ.get("MTPQUANT_STREAM_KILL") == f"{phase}:{layer}":
        os.kill(os.getpid(), 9)
