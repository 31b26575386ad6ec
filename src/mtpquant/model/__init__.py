"""What a model and its quantization are: the model families (families: config keys, layer kinds, MTP layout,
vLLM method, tiny configs), the quantization schemes (schemes: config group, packed tensors, bytes per weight,
error bounds), the YAML recipes and their validation (recipes), and the dequantizer (dequantize).

Imports: mtpquant.core, mtpquant.pins.
"""
