"""`quantize --engine stream` (engine.py): GPTQ one decoder layer at a time, straight from the source shards,
resumable. A layer goes through: reader (its tensors from the shards), build (the layer with its weights), calibrate
(llm-compressor's lifecycle on it), writer (its shard and the activations after it), journal (finished only once
those are durable). inputs: what layer 0 is given; save: config.json and recipe.yaml at the end; device: where
activations wait, determinism, the per-phase timer.
"""

from mtpquant.calib.stream.engine import quantize_stream

__all__ = ["quantize_stream"]
