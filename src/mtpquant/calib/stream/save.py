"""What the stream engine writes once the layers are done, as llm-compressor's save would: config.json with the
quantization_config, recipe.yaml; unquantized tensors in the source's dtypes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from mtpquant.calib.stream.build import meta_skeleton
from mtpquant.calib.stream.reader import read_tensors
from mtpquant.calib.stream.writer import st_dtype
from mtpquant.core.checkpoint import Checkpoint


def restore_source_dtypes(tensors: dict[str, Any], source: Checkpoint) -> list[str]:
    """What quantize.restore_dtypes does after the memory engine's save: an unquantized tensor whose dtype
    differs from the source's is written with the source's bytes."""
    names = []
    src = source.tensors
    changed = [n for n, t in tensors.items() if n in src and st_dtype(t) != src[n].dtype]
    if changed:
        tensors.update(read_tensors(source, changed))
        names = changed
    return names


def final_config(cls: Any, config: Any, modifier: Any, out: Path, source_root: Path) -> Any:
    """config.json as llm-compressor's save writes it: transformers' config, `resave_config`, then
    compressed-tensors' `update_config` from the schemes the modifier attaches to a meta model of all layers."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.utils import patch_attr
    from llmcompressor.core import active_session
    from llmcompressor.modeling.moe import linear_experts
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.transformers.compression.compressed_tensors_utils import (
        resave_config,
        update_and_save_recipe,
    )

    model = meta_skeleton(cls, config)
    with contextlib.ExitStack() as stack, torch.device("meta"):  # names and schemes only: no weights to copy
        for c in (linear_experts.ExpertMLPWithGate, linear_experts.ExpertMLPWithoutGate):
            stack.enter_context(patch_attr(c, "copy_from_experts_module", lambda self, experts, index: None))
        stack.enter_context(patch_attr(linear_experts, "offload_module", lambda module, **kw: None))
        linearize_moe(model)
    session = active_session()
    session.reset()
    session.initialize(model=model, start=-1, recipe=modifier)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    config.save_pretrained(out)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    resave_config(config, out)
    compressor.update_config(out)
    update_and_save_recipe(str(source_root), str(out))
    session.reset()
    return compressor
