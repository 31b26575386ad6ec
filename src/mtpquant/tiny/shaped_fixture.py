"""GLM-5.2-shaped random checkpoints: the real layer dimensions, fewer layers and experts. GLM-5.2
(`glm_moe_dsa`) only: the benchmarks' model; its names and config keys come from that family object.

`fixture.py` builds tiny models in memory; a real-dimension MoE layer is 19 GB in BF16, so this writer takes
names and shapes from a model built on the meta device and generates one tensor at a time (on the GPU
when there is one), writing shards of at most `shard_bytes`. Same on-disk layout as the real checkpoints
(per-expert 2-D expert tensors, FP32 router bias), the fixture's byte-level tokenizer, no MTP layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_dir
from mtpquant.core.checkpoint import INDEX_NAME
from mtpquant.model.families import FAMILIES
from mtpquant.tiny.fixture import VOCAB, write_tokenizer

FAMILY = FAMILIES["glm_moe_dsa"]

# The fixture's attention and MLP sizes (mtpquant.tiny.fixture): the same code path, small enough for a CPU.
SMALL_DIMS = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
                  v_head_dim=64, head_dim=32, index_topk=64, index_head_dim=64, index_n_heads=2)


def glm5_config(num_experts: int = 256, num_layers: int = 2, dense_layers: int = 1, **overrides: Any) -> Any:
    """GLM-5's config (transformers' GlmMoeDsaConfig defaults: its dimensions) with the fixture's small vocabulary."""
    from transformers import AutoConfig

    kw = {FAMILY.layers_key: num_layers, **FAMILY.dense_prefix(dense_layers), FAMILY.experts_key: num_experts,
          **dict(vocab_size=VOCAB, max_position_embeddings=8192, bos_token_id=None, eos_token_id=0, pad_token_id=0,
                 dtype="bfloat16")}
    kw.update(overrides)
    return AutoConfig.for_model(FAMILY.model_type, **kw)


def tensor_specs(config: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """(on-disk name, shape, dtype) of every tensor, experts split per expert, in layer order."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, FAMILY.architecture)(config)
    specs = []
    for name, t in model.state_dict().items():
        if name.endswith(f"{FAMILY.experts}.gate_up_proj"):
            prefix, inter = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                specs += [(f"{prefix}{e}.gate_proj.weight", (inter, t.shape[2]), "bf16"),
                          (f"{prefix}{e}.up_proj.weight", (inter, t.shape[2]), "bf16")]
        elif name.endswith(f"{FAMILY.experts}.down_proj"):
            prefix = name.removesuffix("down_proj")
            specs += [(f"{prefix}{e}.down_proj.weight", tuple(t.shape[1:]), "bf16") for e in range(t.shape[0])]
        else:
            specs.append((name, tuple(t.shape), "fp32" if name.endswith(FAMILY.fp32_suffixes) else "bf16"))
    return specs


def _make(name: str, shape: tuple[int, ...], dtype: str, gen: Any, device: str) -> Any:
    import torch

    if dtype == "fp32":
        return (torch.randn(shape, generator=gen, device=device) * 0.01).float().cpu()
    if "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()


def write_shaped_checkpoint(config: Any, out: Path, seed: int = 0, shard_bytes: int = 4 << 30,
                            device: str | None = None) -> Path:
    """Write the checkpoint to `out` atomically, one shard in memory at a time; returns `out`."""
    import torch
    from safetensors.torch import save_file

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    specs = tensor_specs(config)
    with atomic_dir(Path(out)) as tmp:
        weight_map: dict[str, str] = {}
        shard: dict[str, Any] = {}
        size = total = 0
        files: list[list[str]] = []

        def flush() -> None:
            nonlocal shard, size
            if shard:
                fname = f"shard-{len(files) + 1:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                files.append(list(shard))
                weight_map.update(dict.fromkeys(shard, fname))
                shard, size = {}, 0

        for name, shape, dtype in specs:
            t = _make(name, shape, dtype, gen, device)
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > shard_bytes:
                flush()
            shard[name] = t
            size += nbytes
            total += nbytes
        flush()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        cfg = FAMILY.with_mtp(config.to_dict(), 0)
        cfg["architectures"] = [FAMILY.architecture]
        for k in ("transformers_version", "_name_or_path"):
            cfg.pop(k, None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        write_tokenizer(tmp)
    return Path(out)
