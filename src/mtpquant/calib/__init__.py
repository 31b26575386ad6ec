"""The calibration engine: the quantize stage's two engines, in memory (quantize) and streaming layer by layer
with resume (stream); the fast expert GPTQ path (expert_gptq, weight_transfers), data-parallel ranks (ranks), the
calibration set (calibration), and the cost model and `plan` (calib_cost, plan).

Imports: mtpquant.core, mtpquant.pins, mtpquant.model.
"""
