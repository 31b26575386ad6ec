"""The calibration set: a weighted, seeded mix of sources, tokenized for the model being quantized."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from mtpquant.core.errors import MtpquantError
from mtpquant.model.recipes import REPO_ROOT, UNPINNED, CalibrationRecipe, CalibrationSource


def _allocate(recipe: CalibrationRecipe) -> list[int]:
    """Samples per source, proportional to weight, summing exactly to num_samples."""
    total = sum(s.weight for s in recipe.sources)
    raw = [recipe.num_samples * s.weight / total for s in recipe.sources]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in by_remainder[: recipe.num_samples - sum(counts)]:
        counts[i] += 1
    return counts


def _rows(src: CalibrationSource, where: str) -> list[dict[str, Any]]:
    if src.local is not None:
        path = REPO_ROOT / src.local
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise MtpquantError(f"{path}:{n}: invalid JSON line") from None
        return rows
    if src.revision == UNPINNED:
        raise MtpquantError(f"{where}.revision: dataset {src.hub} is UNPINNED; pin a 40-hex commit first")
    import datasets  # hub sources: only on machines that reach the hub

    ds = datasets.load_dataset(src.hub, src.subset, split=src.split, revision=src.revision)
    return list(ds)


def _render(row: Any, src: CalibrationSource, tokenizer: Any, where: str) -> str:
    key = src.text_field or src.messages_field
    if not isinstance(row, dict):
        raise MtpquantError(f"{where}: a row is a {type(row).__name__}, not an object")
    if key not in row:
        raise MtpquantError(f"{where}: row has no field {key!r} (fields: {', '.join(row)})")
    if src.text_field:
        if not isinstance(row[key], str):
            raise MtpquantError(f"{where}: field {key!r} is a {type(row[key]).__name__}, not text")
        return row[key]
    messages = row[key]
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise MtpquantError(f"{where}: field {key!r} must be a list of {{role, content}} messages")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def check_tokenizer(recipe: CalibrationRecipe, tokenizer: Any, recipe_path: str) -> None:
    """Chat sources need the model's chat template: say so before anything heavy loads."""
    for i, src in enumerate(recipe.sources):
        if src.messages_field and not getattr(tokenizer, "chat_template", None):
            raise MtpquantError(f"{recipe_path}: sources[{i}].messages_field needs a chat template, and this "
                                "model's tokenizer has none (use text_field, or a tokenizer with chat_template)")


def build_dataset(recipe: CalibrationRecipe, tokenizer: Any, recipe_path: str) -> tuple[Any, dict[str, Any]]:
    """A `datasets.Dataset` of input_ids/attention_mask, and a summary (counts, token hash) for the report."""
    import datasets

    check_tokenizer(recipe, tokenizer, recipe_path)
    rng = random.Random(recipe.seed)
    texts: list[str] = []
    per_source = []
    for i, (src, count) in enumerate(zip(recipe.sources, _allocate(recipe), strict=True)):
        where = f"{recipe_path}: sources[{i}]"
        rows = _rows(src, where)
        if len(rows) < count:
            raise MtpquantError(f"{where}: {len(rows)} rows, but the mix asks for {count} samples from it")
        picked = rng.sample(rows, count)
        texts += [_render(r, src, tokenizer, where) for r in picked]
        per_source.append({"source": src.local or src.hub, "samples": count})
    rng.shuffle(texts)
    enc = tokenizer(texts, truncation=True, max_length=recipe.max_seq_length, add_special_tokens=False)
    ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    digest = hashlib.sha256(json.dumps(enc["input_ids"]).encode()).hexdigest()
    tokens = sum(len(x) for x in enc["input_ids"])
    return ds, {"samples": len(texts), "tokens": tokens, "per_source": per_source, "token_ids_sha256": digest}
