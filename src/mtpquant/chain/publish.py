"""`publish`: the artifact, its manifest.json and the report as the model card, to a hub repo in one commit.

Refuses an artifact that failed `verify` (or was never verified) and one whose files differ from its manifest
(`check`). The card is the report with the hub's YAML metadata in front (license, base_model with relation
`quantized`, tags, pipeline, and a `quantization` block), built and parsed back with huggingface_hub's own
ModelCard classes; a real publish also has the hub validate it before anything is uploaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtpquant.core.errors import MtpquantError, printable
from mtpquant.core.run import MANIFEST, Run, manifest_of

TAGS = ["mtpquant", "w4a16", "int4", "gptq", "compressed-tensors", "mtp", "speculative-decoding", "moe"]


@dataclass(frozen=True)
class Upload:
    path_in_repo: str
    local: Path
    bytes: int
    sha256: str


def checked_files(run: Run, artifact: Path) -> list[Upload]:
    """The artifact's files as its manifest lists them, after `verify` passed on it and `check` finds it intact."""
    from mtpquant.chain.manifest import check_manifest, raise_on_mismatch

    rec = run.read_record("verify")
    if rec is None:
        raise MtpquantError(f"{run.record_path('verify')}: missing; run `mtpquant verify --run {run.root}` first")
    if Path(rec.get("artifact", "")).resolve() != artifact.resolve():
        raise MtpquantError(f"{run.record_path('verify')}: verified {rec.get('artifact')}, not {artifact}")
    if not rec.get("ok"):
        failed = [c["name"] for c in rec.get("checks", []) if not c.get("ok")]
        raise MtpquantError(f"{run.record_path('verify')}: verify failed ({', '.join(failed) or '?'}); "
                            "an artifact that fails verify is never published")
    if not manifest_of(artifact).is_file():
        raise MtpquantError(f"{manifest_of(artifact)}: missing; run `mtpquant manifest --run {run.root}` first")
    checked = check_manifest(artifact)
    raise_on_mismatch(checked, artifact)
    out = [Upload(name, artifact / name, e["bytes"], e["sha256"]) for name, e in sorted(checked["entries"].items())]
    from mtpquant.core.checkpoint import file_sha256

    m = manifest_of(artifact)
    return out + [Upload(MANIFEST, m, m.stat().st_size, file_sha256(m))]


def card_metadata(run: Run, artifact: Path) -> dict[str, Any]:
    from mtpquant.core.checkpoint import read_json
    from mtpquant.model import recipes

    prep = run.read_record("prepare") or {}
    quant = run.read_record("quantize") or {}
    src = prep.get("source", {})
    license_ = "other"
    if prep.get("recipe"):
        license_ = recipes.load("models", prep["recipe"]).license
    qc = read_json(artifact / "config.json").get("quantization_config", {})
    meta: dict[str, Any] = {"license": license_, "library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": TAGS}
    if src.get("hub"):
        meta |= {"base_model": src["hub"], "base_model_relation": "quantized"}
    meta["quantization"] = {
        "method": "gptq", "tool": "llm-compressor", "format": qc.get("format"),
        "config_groups": qc.get("config_groups"), "quantized": "routed-expert Linears only",
        "kept_bf16": "attention (incl. indexer), dense layers, shared experts, router, embeddings, lm_head, MTP",
        "quantized_linears": quant.get("quantized_linears"),
        "base_revision": src.get("revision"),
    }
    return meta


def model_card(run: Run, artifact: Path) -> Any:
    from huggingface_hub import ModelCard, ModelCardData

    if not run.report.is_file():
        raise MtpquantError(f"{run.report}: missing; run `mtpquant report --run {run.root}` first (it is the card)")
    meta = card_metadata(run, artifact)
    data = ModelCardData(**meta)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{run.report.read_text()}")
    parsed = ModelCard(str(card)).data.to_dict()  # what the hub will read back
    lost = sorted(k for k, v in meta.items() if parsed.get(k) != v)
    if lost:
        raise MtpquantError(f"model card: metadata {', '.join(lost)} does not survive the hub's YAML round trip")
    return card


def publish(run: Run, repo: str, artifact: Path | None = None, dry_run: bool = False) -> dict[str, Any]:
    artifact = Path(artifact or run.artifact)
    uploads = checked_files(run, artifact)
    card = model_card(run, artifact)
    plan = {"repo": repo, "files": [{"path": u.path_in_repo, "bytes": u.bytes, "sha256": u.sha256} for u in uploads],
            "card": str(card), "bytes": sum(u.bytes for u in uploads)}
    if dry_run:
        return plan | {"dry_run": True}
    from huggingface_hub import CommitOperationAdd, HfApi

    card.validate()  # the hub's own metadata validation, before anything is uploaded
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    ops = [CommitOperationAdd(u.path_in_repo, str(u.local)) for u in uploads]
    ops.append(CommitOperationAdd("README.md", str(card).encode()))
    info = api.create_commit(repo, operations=ops, commit_message=f"mtpquant artifact {artifact.name}")
    return plan | {"dry_run": False, "commit": info.oid, "url": info.commit_url}


def render(plan: dict[str, Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"{'would upload' if plan['dry_run'] else 'uploaded'} to {plan['repo']} "
                    f"({plan['bytes'] / 2**30:.2f} GiB, {len(plan['files']) + 1} files, one commit)")
    for col in ("file", "bytes", "sha256"):
        t.add_column(col, justify="right" if col == "bytes" else "left")
    for f in plan["files"]:
        t.add_row(Text(printable(f["path"])), str(f["bytes"]), f["sha256"])  # a file name is not markup
    t.add_row("README.md", str(len(plan["card"].encode())), "(the model card, below)")
    return t
