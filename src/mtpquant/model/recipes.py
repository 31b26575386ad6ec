"""YAML recipes, loaded and validated into typed objects.

A bad recipe gives one line naming the file and the key: an unknown key, a wrong type, a missing key,
or a value a check refuses (for example a hub source without a pinned 40-hex revision).
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtpquant.core.errors import MtpquantError
from mtpquant.model.schemes import SCHEMES, PackedIntScheme
from mtpquant.pins.locks import SHA40

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPES_DIR = REPO_ROOT / "recipes"
UNPINNED = "UNPINNED"  # a hub revision nobody has audited yet: loads, but the stages that download refuse it


class RecipeError(MtpquantError):
    pass


def key(where: str, name: str) -> str:
    """'file.yaml' + 'a' -> 'file.yaml: a'; 'file.yaml: a' + 'b' -> 'file.yaml: a.b'."""
    return f"{where}{'.' if ': ' in where else ': '}{name}"


# ---- recipe types ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixtureSpec:
    """A tiny random model in the real on-disk layout (see mtpquant.tiny.fixture). The field names are the spec's own
    vocabulary (DeepSeek-style); each family's `tiny_config` maps them to its config keys."""

    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    num_nextn_predict_layers: int = 1
    hidden_size: int = 256
    moe_intermediate_size: int = 128
    intermediate_size: int = 512
    num_shards: int = 3
    seed: int = 0

    def check(self, where: str) -> None:
        if self.hidden_size % 128 or self.moe_intermediate_size % 128:
            raise RecipeError(f"{where}: hidden_size and moe_intermediate_size must be multiples of 128 "
                              "(group-128 quantization)")
        if not 0 <= self.first_k_dense_replace < self.num_hidden_layers:
            raise RecipeError(f"{where}: first_k_dense_replace must leave at least one MoE layer")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise RecipeError(f"{where}: num_experts_per_tok exceeds n_routed_experts")


@dataclass(frozen=True)
class ModelSource:
    hub: str | None = None  # Hugging Face repo id
    revision: str | None = None  # 40-hex commit of the hub repo
    path: str | None = None  # a local checkpoint directory
    fixture: FixtureSpec | None = None  # generate it (tiny models)
    lock: str | None = None  # a hub source's lock file (default: pinned/sources/<recipe name>.lock)

    def check(self, where: str) -> None:
        given = [k for k in ("hub", "path", "fixture") if getattr(self, k) is not None]
        if len(given) != 1:
            raise RecipeError(f"{where}: give exactly one of hub, path, fixture (got {given or 'none'})")
        if self.hub is not None:
            check_revision(self.revision, key(where, "revision"))
        elif self.lock is not None:
            raise RecipeError(f"{key(where, 'lock')}: only a hub source has a source lock")
        if self.fixture is not None:
            self.fixture.check(key(where, "fixture"))


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    family: str  # a key of mtpquant.model.families.FAMILIES
    source: ModelSource
    description: str = ""
    # config.json fields of a hub model that is not downloaded yet, for `mtpquant plan` (a fixture's or a
    # local checkpoint's own config wins)
    config: dict[str, Any] | None = None
    license: str = "other"  # the base model's license id on the hub (the published card's `license`)

    def check(self, where: str) -> None:
        from mtpquant.model.families import FAMILIES

        if self.family not in FAMILIES:
            allowed = ", ".join(repr(a) for a in FAMILIES)
            raise RecipeError(f"{key(where, 'family')}: {self.family!r} is not one of {allowed}")


@dataclass(frozen=True)
class GPTQSettings:
    targets: list[str]
    scheme: str  # a name in mtpquant.model.schemes.SCHEMES: the weights' format, bits, groups, symmetry
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    block_size: int = 128
    dampening_frac: float = 0.01
    actorder: Literal["static", "group", "weight"] | None = "static"


@dataclass(frozen=True)
class FastExperts:
    """Optional `fast_experts` section: routed experts calibrated by mtpquant.calib.expert_gptq.

    Same GPTQ maths as llm-compressor's (every expert sees every calibration token): one gate/up Hessian
    per MoE layer, Hessians from bf16 activations with FP32 accumulation, large token chunks, a batched
    solve. benchmarks/CALIB_SPEED.md has what each option measured.
    """

    hessian_inputs: Literal["fp32", "tf32", "bf16"] = "bf16"  # operand precision of X^T X; always FP32 sums
    token_chunk: int = 16384  # tokens buffered per MoE layer before the all-experts Hessian pass
    solve_rows: int = 131072  # gate/up weight rows solved at once against the shared Hessian
    sequential_prefetch: bool = False  # llm-compressor: fetch the next batch's activations in a thread
    # the model's routed forward while calibrating: grouped GEMMs over tokens sorted by expert, a loop over
    # experts on the sorted tokens, or llm-compressor's own (one host sync per expert per call)
    routed_forward: Literal["grouped_mm", "sorted", "llm_compressor"] = "grouped_mm"
    # where the sequential pipeline keeps the activations between subgraphs: llm-compressor's default (the
    # CPU, copied to and from the GPU per sample in both passes), the GPU, or the GPU when they take at most
    # ACTIVATIONS_GPU_FRACTION of the card (mtpquant.calib.quantize.activation_device)
    activations: Literal["cpu", "gpu", "auto"] = "cpu"
    # prefetch the next decoder layer's weights to the GPU while this one calibrates, and write quantized
    # weights back to the CPU copy in the background (mtpquant.calib.weight_transfers)
    overlap_weights: bool = False

    def check(self, where: str) -> None:
        for name in ("token_chunk", "solve_rows"):
            if getattr(self, name) <= 0:
                raise RecipeError(f"{key(where, name)}: must be > 0")


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    gptq: GPTQSettings
    pipeline: Literal["sequential", "basic"] = "sequential"
    sequential_targets: list[str] | None = None
    moe_calibrate_all_experts: bool = True
    fast_experts: FastExperts | None = None
    description: str = ""

    @property
    def scheme(self) -> PackedIntScheme:
        return SCHEMES[self.gptq.scheme]

    def check(self, where: str) -> None:
        if self.fast_experts is not None:
            self.fast_experts.check(key(where, "fast_experts"))
            if self.pipeline != "sequential":
                raise RecipeError(f"{key(where, 'fast_experts')}: needs pipeline: sequential (it solves each "
                                  "layer at the end of its calibration pass)")
        if not self.moe_calibrate_all_experts:
            raise RecipeError(
                f"{key(where, 'moe_calibrate_all_experts')}: must be true: calibrating only routed tokens skips "
                "rare experts and quietly degrades the model (seed write-up)")
        if self.gptq.scheme not in SCHEMES:
            raise RecipeError(f"{key(where, 'gptq.scheme')}: unknown scheme {self.gptq.scheme!r}; known: "
                              f"{', '.join(SCHEMES)}")
        for t in self.gptq.targets:
            if t != ROUTED_EXPERTS and not t.startswith("re:"):
                raise RecipeError(f"{key(where, 'gptq.targets')}: {t!r} must be '{ROUTED_EXPERTS}' or a 're:' regex")


ROUTED_EXPERTS = "routed_experts"  # symbolic target, resolved by the model family to an anchored regex


@dataclass(frozen=True)
class CalibrationSource:
    weight: float
    local: str | None = None  # a JSONL file, relative to the repo root
    hub: str | None = None  # a Hugging Face dataset id
    revision: str | None = None
    subset: str | None = None
    split: str = "train"
    text_field: str | None = None  # a plain-text column
    messages_field: str | None = None  # a chat column, rendered with the model's chat template

    def check(self, where: str) -> None:
        if (self.local is None) == (self.hub is None):
            raise RecipeError(f"{where}: give exactly one of local, hub")
        if (self.text_field is None) == (self.messages_field is None):
            raise RecipeError(f"{where}: give exactly one of text_field, messages_field")
        if self.weight <= 0:
            raise RecipeError(f"{key(where, 'weight')}: must be > 0")
        if self.hub is not None:
            check_revision(self.revision, key(where, "revision"))
        if self.local is not None and not (REPO_ROOT / self.local).is_file():
            raise RecipeError(f"{key(where, 'local')}: file not found: {self.local}")


@dataclass(frozen=True)
class CalibrationRecipe:
    name: str
    sources: list[CalibrationSource]
    num_samples: int
    max_seq_length: int
    seed: int = 0
    description: str = ""

    def check(self, where: str) -> None:
        if not self.sources:
            raise RecipeError(f"{key(where, 'sources')}: at least one source is needed")
        for i, s in enumerate(self.sources):
            s.check(key(where, f"sources[{i}]"))
        if self.num_samples <= 0 or self.max_seq_length <= 0:
            raise RecipeError(f"{where}: num_samples and max_seq_length must be > 0")


@dataclass(frozen=True)
class ServeProfile:
    """How vLLM serves an artifact on one kind of machine (see mtpquant.serving.serve)."""

    name: str
    platform: Literal["gpu", "cpu"]
    max_model_len: int
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    num_speculative_tokens: int = 0  # MTP draft tokens per step; 0 serves without MTP
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "bfloat16"] = "auto"
    gpu_memory_utilization: float | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_auto_tool_choice: bool = False
    dequantize: bool = False  # serve a BF16 copy with the same weight values (no INT4 MoE kernel here)
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    ready_timeout_s: int = 600
    host: str = "127.0.0.1"  # 0.0.0.0 to serve other machines
    port: int = 8000
    description: str = ""

    def check(self, where: str) -> None:
        for k in ("max_model_len", "tensor_parallel_size", "data_parallel_size", "ready_timeout_s"):
            if getattr(self, k) <= 0:
                raise RecipeError(f"{key(where, k)}: must be > 0")
        if self.num_speculative_tokens < 0:
            raise RecipeError(f"{key(where, 'num_speculative_tokens')}: must be >= 0")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise RecipeError(f"{key(where, 'enable_auto_tool_choice')}: needs tool_call_parser")
        if self.platform == "cpu" and (self.tensor_parallel_size > 1 or self.gpu_memory_utilization):
            raise RecipeError(f"{where}: a cpu profile takes no tensor parallelism or gpu_memory_utilization")
        if self.platform == "gpu" and self.dequantize:
            raise RecipeError(f"{key(where, 'dequantize')}: only for cpu profiles (GPUs run the INT4 kernels)")


@dataclass(frozen=True)
class EvalTask:
    task: str  # an lm-eval task name, or a task YAML under recipes/eval/tasks/ (local, offline)
    metric: str  # e.g. "exact_match,strict-match"
    reference: dict[str, float] = field(default_factory=dict)  # label -> published score
    num_fewshot: int | None = None
    limit: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # lm-eval --metadata (e.g. RULER lengths)


@dataclass(frozen=True)
class EvalSuite:
    name: str
    tasks: list[EvalTask]
    model: Literal["local-completions", "local-chat-completions"] = "local-completions"
    num_concurrent: int = 8
    max_gen_toks: int | None = None
    # JSONL with question/answer fields: next-token log-probabilities on the reference answers are recorded
    # (teacher-forced), so artifacts can be compared with BF16 by KL divergence and top-1 flip rate.
    logprob_data: str | None = None
    description: str = ""

    def check(self, where: str) -> None:
        if self.logprob_data is not None and not (REPO_ROOT / self.logprob_data).is_file():
            raise RecipeError(f"{key(where, 'logprob_data')}: file not found: {self.logprob_data}")
        if not self.tasks:
            raise RecipeError(f"{key(where, 'tasks')}: at least one task is needed")
        for i, t in enumerate(self.tasks):
            if "," not in t.metric:
                raise RecipeError(f"{key(where, f'tasks[{i}].metric')}: must be 'metric,filter' as lm-eval "
                                  f"reports it, got {t.metric!r}")


@dataclass(frozen=True)
class BenchGrid:
    name: str
    concurrency: list[int]
    dataset: Literal["custom", "random", "sharegpt"] = "custom"
    dataset_path: str | None = None  # JSONL with a "prompt" field (custom), relative to the repo root
    prompts_per_concurrency: int = 8  # num_prompts = this x concurrency (the seed's bench)
    min_prompts: int = 16
    input_len: int = 1024  # random dataset only
    output_len: int = 512
    mtp: list[bool] = field(default_factory=lambda: [True, False])  # serve with and without MTP
    api: Literal["completions", "chat"] = "completions"
    seed: int = 0
    # Each (MTP setting, concurrency) point is measured this many times, the settings interleaved (A B, B A, ...):
    # one run of each on a shared machine measures the load, not MTP.
    repeats: int = 3
    # Both servers up at once, so that each repetition of A and B sees the same machine; where one server fills
    # the machine (GLM-5.2 on 8xH200) they run one after the other, each repeated.
    together: bool = True
    description: str = ""

    def check(self, where: str) -> None:
        if self.repeats < 3:
            raise RecipeError(f"{key(where, 'repeats')}: at least 3 (a median and a spread need them)")
        if not self.concurrency or any(c <= 0 for c in self.concurrency):
            raise RecipeError(f"{key(where, 'concurrency')}: a non-empty list of positive integers")
        if self.dataset == "custom":
            if not self.dataset_path:
                raise RecipeError(f"{key(where, 'dataset_path')}: needed for dataset 'custom'")
            if not (REPO_ROOT / self.dataset_path).is_file():
                raise RecipeError(f"{key(where, 'dataset_path')}: file not found: {self.dataset_path}")
        if not self.mtp:
            raise RecipeError(f"{key(where, 'mtp')}: list at least one of true, false")


KINDS: dict[str, type] = {"models": ModelRecipe, "quant": QuantRecipe, "calibration": CalibrationRecipe,
                          "serve": ServeProfile, "eval": EvalSuite, "bench": BenchGrid}


def check_revision(rev: str | None, where: str) -> None:
    if rev != UNPINNED and (not isinstance(rev, str) or not SHA40.match(rev)):
        raise RecipeError(f"{where}: must be a 40-hex commit SHA (or {UNPINNED!r}), got {rev!r}")


# ---- generic loader ----------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(repr(a) for a in typing.get_args(tp))
            raise RecipeError(f"{where}: {value!r} is not one of {allowed}")
        return value
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: must be a mapping, got {type(value).__name__}")
        kt, vt = typing.get_args(tp)
        return {_convert(k, kt, f"{where}.{k}"): _convert(v, vt, key(where, str(k))) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise RecipeError(f"{where}: must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key_ = key(where, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key_)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{key_}: missing required key")
    obj = cls(**kwargs)
    return obj


def kind_dir(kind: str) -> Path:
    return RECIPES_DIR / kind


def resolve_path(kind: str, ref: str | Path) -> Path:
    """A recipe reference: a path to a YAML file, or a bare name looked up in recipes/<kind>/."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml"):
        return p
    return kind_dir(kind) / f"{ref}.yaml"


def load(kind: str, ref: str | Path) -> Any:
    if kind not in KINDS:
        raise RecipeError(f"unknown recipe kind {kind!r}")
    path = resolve_path(kind, ref)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: invalid YAML{line}") from None
    where = str(path)
    obj = _build(KINDS[kind], data, where)
    if hasattr(obj, "check"):
        obj.check(where)
    if kind == "models":
        obj.source.check(key(where, "source"))
    return obj


def recipe_sha256(kind: str, ref: str | Path) -> str:
    return hashlib.sha256(resolve_path(kind, ref).read_bytes()).hexdigest()
