"""Tiny models in the real on-disk layout, for the demo and the tests: random fixtures of every family
(fixture), GLM-5.2-shaped layers for benchmarks (shaped_fixture), and the trained tiny-arith model (train_tiny,
tiny_task). Runtime code uses it only to prepare the embedded tiny defaults.

Imports: mtpquant.core, mtpquant.model.
"""
