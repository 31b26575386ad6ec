"""Quantization schemes: one object per scheme, registered in `SCHEMES`; nothing else knows a packed layout.

A scheme owns: its compressed-tensors config group (what llm-compressor's GPTQModifier is given and what the
saved `quantization_config` holds), the tensors one quantized Linear has on disk with their dtypes and shapes,
its bytes per weight, the dequantizer (compressed-tensors' own decompressor), round-to-nearest (the baseline
GPTQ must beat) and the value bounds `verify` holds a GPTQ weight to. A quant recipe picks one by name
(`gptq.scheme`); `verify` and `dequantize` find it from an artifact's `quantization_config`.

Today: integer weights, grouped, compressed-tensors `pack-quantized` (`PackedIntScheme`): W4A16 asymmetric and
symmetric, W8A16 asymmetric, group 128. A scheme of another layout (NVFP4, W4AFP8) is another class here with
the same methods, and a line in `SCHEMES`.

Imports: only mtpquant.core.errors (torch and compressed-tensors lazily, inside the methods that need them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtpquant.core.errors import MtpquantError

BF16_BYTES = 2
QUANT_METHOD = "compressed-tensors"
PACKED = "weight_packed"  # the part that marks a module as quantized
ZERO_POINT = "weight_zero_point"  # stored only by asymmetric schemes


@dataclass(frozen=True)
class PackedIntScheme:
    """Integer weights in groups of K, packed into int32 along K (compressed-tensors `pack-quantized`),
    BF16 scales, and when asymmetric int32-packed zero points along N."""

    name: str
    label: str  # short name in tables and reports, e.g. "W4A16"
    num_bits: int
    group_size: int
    symmetric: bool
    # verify's value bounds (see verify.py for how they were measured): a module's relative error at most
    # max_error_vs_rtn x its round-to-nearest error, the worst group's error norm at most max_group_relative x
    # that group's weight norm
    max_error_vs_rtn: float = 3.0
    max_group_relative: float = 2.0
    format: str = "pack-quantized"
    # every part this layout may store (a symmetric scheme stores no zero point), and what dequantize drops
    # besides: the g_idx of activation-ordered groups
    LAYOUT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
    EXTRA_PARTS = ("weight_g_idx",)

    @property
    def description(self) -> str:
        """'INT4, group 128, asymmetric'."""
        return f"INT{self.num_bits}, group {self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}"

    def weights_args(self) -> dict[str, Any]:
        """The config group's `weights`, as compressed-tensors' QuantizationArgs takes them."""
        return {"num_bits": self.num_bits, "type": "int", "symmetric": self.symmetric, "strategy": "group",
                "group_size": self.group_size}

    def config_group(self, targets: list[str], actorder: str | None) -> dict[str, Any]:
        """One entry of GPTQModifier's `config_groups`."""
        return {"targets": targets, "weights": {**self.weights_args(), "actorder": actorder}}

    def matches_config(self, weights: dict[str, Any], fmt: str | None) -> bool:
        """True when a saved config group's `weights` (and the config's format) are this scheme's."""
        return fmt == self.format and all(weights.get(k) == v for k, v in self.weights_args().items())

    @property
    def needs_expert_parallel(self) -> bool:
        """Asymmetric MoE scales and zero points (packed along N) are mis-sharded by vLLM's plain tensor
        parallelism (vLLM #41511, #50196, seen with INT4): the experts must be spread by expert parallelism."""
        return not self.symmetric

    def parts(self) -> tuple[str, ...]:
        """The parts one quantized Linear of this scheme stores."""
        return tuple(p for p in self.LAYOUT_PARTS if p != ZERO_POINT or not self.symmetric)

    def tensors(self, n: int, k: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """part -> (safetensors dtype, shape) of one quantized [n, k] Linear on disk."""
        per_word = 32 // self.num_bits
        out = {"weight_packed": ("I32", (n, math.ceil(k / per_word))),
               "weight_scale": ("BF16", (n, k // self.group_size)),
               "weight_zero_point": ("I32", (math.ceil(n / per_word), k // self.group_size)),
               "weight_shape": ("I64", (2,))}
        return {p: out[p] for p in self.parts()}

    def check_shape(self, n: int, k: int, where: str) -> None:
        if k % self.group_size:
            raise MtpquantError(f"{where} [{n}, {k}]: K is not a multiple of group_size {self.group_size}")

    @property
    def bytes_per_weight(self) -> float:
        """On-disk bytes per quantized weight: the packed value, a BF16 scale and (asymmetric) a packed zero
        point per group."""
        value = self.num_bits / 8
        return value + BF16_BYTES / self.group_size + (0 if self.symmetric else value / self.group_size)

    def _ct_scheme(self) -> Any:
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme(targets=[], weights=self.weights_args())

    def dequantize(self, parts: dict[str, Any]) -> Any:
        """A module's on-disk parts (local names: weight_packed, ...) -> its weight, through compressed-tensors'
        own PackedQuantizationCompressor."""
        from compressed_tensors.compressors import PackedQuantizationCompressor

        return PackedQuantizationCompressor.decompress(parts, self._ct_scheme())["weight"]

    def rtn(self, w: Any) -> Any:
        """Round-to-nearest fake quantization of a [N, K] weight per group of K (min/max range, compressed-tensors'
        `calculate_qparams`), back in BF16."""
        import torch
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from compressed_tensors.quantization.utils import calculate_qparams

        args = QuantizationArgs(**self.weights_args())
        n, k = w.shape
        self.check_shape(n, k, "weight")
        x = w.to(torch.float32)
        grouped = x.reshape(n, k // self.group_size, self.group_size)
        scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        return fake_quantize(x, scale, zp, args).to(torch.bfloat16)


DEFAULT = W4A16_ASYM_G128 = PackedIntScheme("w4a16-asym-g128", "W4A16", num_bits=4, group_size=128, symmetric=False)
SCHEMES: dict[str, PackedIntScheme] = {s.name: s for s in (
    W4A16_ASYM_G128,
    PackedIntScheme("w4a16-sym-g128", "W4A16", num_bits=4, group_size=128, symmetric=True),
    # INT8 steps are 16x finer than INT4's: the group bound is INT4's / 16 (measured 2026-12-02 on a random
    # glm4_moe fixture, tests/test_schemes.py: 1.47x its RTN error, worst group 0.01x its weight norm)
    PackedIntScheme("w8a16-asym-g128", "W8A16", num_bits=8, group_size=128, symmetric=False,
                    max_group_relative=2.0 / 16),
)}


def scheme(name: str) -> PackedIntScheme:
    """The registered scheme `name`; an unknown one is a one-line error listing the known ones."""
    if name not in SCHEMES:
        raise MtpquantError(f"unknown quantization scheme {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def group_weights(qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """config group name -> its `weights` mapping ({} where malformed)."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict):
        return {}
    return {n: (g.get("weights") if isinstance(g, dict) and isinstance(g.get("weights"), dict) else {})
            for n, g in groups.items()}


def scheme_of_weights(weights: dict[str, Any], fmt: str | None) -> PackedIntScheme | None:
    return next((s for s in SCHEMES.values() if s.matches_config(weights, fmt)), None)


def label_of(model_dir: Path) -> str:
    """A checkpoint's scheme label for tables and plots ("W4A16"), from its config.json's quantization_config
    or, for a dequantized BF16 copy, the one its dequantized.json recorded; "quantized" when neither names a
    known scheme."""
    for name in ("config.json", "dequantized.json"):
        try:
            qc = json.loads((Path(model_dir) / name).read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(qc, dict):
            found = {scheme_of_weights(w, qc.get("format")) for w in group_weights(qc).values()}
            if len(found) == 1 and None not in found:
                return found.pop().label  # type: ignore[union-attr]
    return "quantized"


def scheme_for_config(qc: dict[str, Any], where: str) -> PackedIntScheme:
    """The one scheme an artifact's `quantization_config` describes (every config group must be it)."""
    if qc.get("quant_method") != QUANT_METHOD:
        raise MtpquantError(f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}, "
                            f"expected {QUANT_METHOD}")
    found = {gname: scheme_of_weights(w, qc.get("format")) for gname, w in group_weights(qc).items()}
    if not found:
        raise MtpquantError(f"{where}: quantization_config has no config_groups")
    for gname, s in found.items():
        if s is None:
            raise MtpquantError(f"{where}: quantization_config.config_groups.{gname} (format "
                                f"{qc.get('format')!r}) is no known scheme ({', '.join(SCHEMES)})")
    names = {s.name for s in found.values() if s}
    if len(names) > 1:
        raise MtpquantError(f"{where}: quantization_config mixes schemes {sorted(names)}")
    return next(s for s in found.values() if s)
