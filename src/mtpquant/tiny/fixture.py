"""Tiny random checkpoints of any registered family in its real on-disk layout.

What makes the layout "real" (and differs from what `save_pretrained` writes for a fresh model):
- routed experts as per-expert 2-D tensors `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`
  (transformers fuses them into 3-D tensors in memory and converts on load);
- the MTP layer(s) where the family stores them (`Family.mtp_block`: `model.layers.{num_hidden_layers + i}`
  or under a prefix such as `mtp.`), a full decoder block plus the family's `mtp_extra` tensors, which
  `from_pretrained` drops;
- FP32 router biases (`Family.fp32_suffixes`, e.g. `e_score_correction_bias`) beside BF16 weights;
- several shards plus `model.safetensors.index.json`, a tokenizer, the family's MTP-count config key.
The family's `tiny_config` gives the dimensions. Same spec and seed give the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_dir
from mtpquant.core.checkpoint import INDEX_NAME
from mtpquant.model.families import FAMILIES, layer_prefix
from mtpquant.model.families.base import FIXTURE_VOCAB as VOCAB
from mtpquant.model.families.base import LAYERS
from mtpquant.model.recipes import FixtureSpec

SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def config_for(family: str, spec: FixtureSpec, num_layers: int | None = None) -> Any:
    """A transformers config of the family with the spec's tiny dimensions."""
    return FAMILIES[family].tiny_config(spec, num_layers or spec.num_hidden_layers)


def unfuse_experts(name: str, t: Any) -> dict[str, Any]:
    """transformers' fused 3-D expert tensors -> the on-disk per-expert 2-D tensors (others pass through)."""
    if name.endswith("mlp.experts.gate_up_proj"):
        prefix = name.removesuffix("gate_up_proj")
        inter = t.shape[1] // 2
        out = {}
        for e in range(t.shape[0]):
            out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
            out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].contiguous()
        return out
    if name.endswith("mlp.experts.down_proj"):
        prefix = name.removesuffix("down_proj")
        return {f"{prefix}{e}.down_proj.weight": t[e].contiguous() for e in range(t.shape[0])}
    return {name: t}


def fixture_tensors(family: str, spec: FixtureSpec) -> dict[str, Any]:
    """All tensors of the checkpoint, by on-disk name, in a deterministic order."""
    import torch
    import transformers

    fam = FAMILIES[family]
    n, n_mtp = spec.num_hidden_layers, spec.num_nextn_predict_layers
    torch.manual_seed(spec.seed)
    # One model with n + n_mtp layers: the extra decoder blocks become the MTP layers' blocks.
    big = getattr(transformers, fam.architecture)(config_for(family, spec, n + n_mtp)).eval()
    h, cfg = spec.hidden_size, fam.fixture_config(spec)
    out: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(spec.seed + 1)
    moved = {layer_prefix(n + i): fam.mtp_block(cfg, i) for i in range(n_mtp)}
    for name, t in big.state_dict().items():
        t = t.detach()
        fp32 = name.endswith(fam.fp32_suffixes)
        if t.is_floating_point() and t.ndim >= 1 and not fp32:
            if "norm" not in name:  # random, not the init's zeros/ones, so every tensor's bytes are distinct
                t = torch.randn(t.shape, generator=gen) * 0.05
            t = t.to(torch.bfloat16)
        if fp32:
            t = (torch.randn(t.shape, generator=gen) * 0.01).to(torch.float32)  # FP32 in real checkpoints
        out.update(unfuse_experts(_moved(name, moved), t))
    for p in fam.mtp_prefixes(cfg):
        for extra in fam.mtp_extra:
            shape = fam.mtp_extra_shape(extra, h, VOCAB)
            out[p + extra] = (torch.ones(shape) if "norm" in extra
                              else torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16)
    return out


def _moved(name: str, moved: dict[str, str]) -> str:
    """The extra decoder blocks of the fixture's model, renamed to where the family stores MTP blocks."""
    for src, dst in moved.items():
        if name.startswith(src):
            return dst + name.removeprefix(src)
    return name


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if name.startswith(LAYERS):
        return (int(parts[2]) + 1, name)
    return (0 if "embed" in name else 10**9, name)


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {c: i + len(SPECIALS) for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {s: i for i, s in enumerate(SPECIALS)} | byte_vocab
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:], model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def write_fixture(family: str, spec: FixtureSpec, out: Path) -> Path:
    """Write the checkpoint to `out` atomically and return it."""
    return write_checkpoint(family, spec, fixture_tensors(family, spec), out)


def write_checkpoint(family: str, spec: FixtureSpec, tensors: dict[str, Any], out: Path,
                     finish: Callable[[Path], None] | None = None) -> Path:
    """Write `tensors` (on-disk names) as a sharded checkpoint with config and tokenizer, atomically;
    `finish(tmp_dir)` may add files before the directory is renamed into place."""
    from safetensors.torch import save_file

    names = sorted(tensors, key=_layer_key)
    sizes = {k: tensors[k].numel() * tensors[k].element_size() for k in names}
    per_shard = sum(sizes.values()) / spec.num_shards
    shards: list[list[str]] = [[]]
    acc = 0.0
    for k in names:
        if acc >= per_shard * len(shards) and len(shards) < spec.num_shards:
            shards.append([])
        shards[-1].append(k)
        acc += sizes[k]
    with atomic_dir(Path(out)) as tmp:
        weight_map = {}
        for i, keys in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, fname))
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = FAMILIES[family].fixture_config(spec)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_tokenizer(tmp)
        if finish is not None:
            finish(tmp)
    return Path(out)
