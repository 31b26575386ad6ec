"""Only the family objects (mtpquant.model.families) read a model config key: every other module asks its Family.

The keys are every key a family's config.json has (each family's tiny fixture config, which is transformers'
own config class of that family) plus the keys a Family declares, less the fields every transformers config
has (`architectures`, `dtype`, ...; `model_type` stays: it picks the family). A module outside
model/families fails on any of them as a string key: `c["k"]`, `c.get("k")` / `.pop` / `.setdefault`,
`"k" in c`, a `{"k": ...}` literal, or an attribute of a config object (`config.k`, `model.config.k`).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mtpquant"
OWNER = SRC / "model" / "families"
# (module relative to src/mtpquant, key) -> why it may stay. Keep this short.
ALLOWED: dict[tuple[str, str], str] = {}
CONFIG_NAMES = ("config", "cfg")  # attribute reads on objects whose name ends so are config reads


def config_keys() -> set[str]:
    import transformers

    from mtpquant.model.families import FAMILIES
    from mtpquant.model.recipes import FixtureSpec

    keys: set[str] = set()
    for fam in FAMILIES.values():
        keys |= set(fam.fixture_config(FixtureSpec()))
        keys |= {fam.layers_key, fam.experts_key, fam.mtp_key, *fam.match_keys(), *fam.dense_prefix(1)}
    return (keys - set(transformers.PretrainedConfig().to_dict())) | {"model_type"}


def _key(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def config_reads(source: str, keys: set[str]) -> list[tuple[int, str]]:
    """(line, key) of every model config key that `source` reads or writes by name."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        found: list[str | None] = []
        if isinstance(node, ast.Subscript):
            found = [_key(node.slice)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args and \
                node.func.attr in ("get", "pop", "setdefault"):
            found = [_key(node.args[0])]
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            found = [_key(node.left)]
        elif isinstance(node, ast.Dict):
            found = [_key(k) for k in node.keys if k is not None]
        elif isinstance(node, ast.Attribute) and ast.unparse(node.value).lower().endswith(CONFIG_NAMES):
            found = [node.attr]
        hits += [(node.lineno, k) for k in found if k in keys]
    return sorted(set(hits))


def offenders(root: Path, keys: set[str]) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        if path.is_relative_to(root / "model" / "families"):
            continue
        rel = path.relative_to(root).as_posix()
        out += [f"src/mtpquant/{rel}:{line}: {key!r}" for line, key in config_reads(path.read_text(), keys)
                if (rel, key) not in ALLOWED]
    return out


@pytest.fixture(scope="module")
def keys() -> set[str]:
    return config_keys()


def test_no_module_but_the_families_reads_a_model_config_key(keys):
    found = offenders(SRC, keys)
    assert not found, "model config keys belong to mtpquant.model.families (ask the Family):\n" + "\n".join(found)


def test_the_allowed_reads_are_still_there(keys):
    """An allowance whose read is gone is removed, not kept."""
    for rel, key in ALLOWED:
        assert (rel, key) in {(rel, k) for _, k in config_reads((SRC / rel).read_text(), keys)}, (rel, key)


def test_the_keys_are_the_families_own(keys):
    assert {"num_hidden_layers", "n_routed_experts", "num_experts", "num_nextn_predict_layers", "hidden_size",
            "num_experts_per_tok", "num_attention_heads", "first_k_dense_replace", "model_type"} <= keys
    assert not {"architectures", "dtype", "quantization_config", "task", "weight_map"} & keys


@pytest.mark.parametrize("line", [
    'h = config["hidden_size"]',
    'k = int(cfg.get("num_experts_per_tok", 1))',
    'ck.config.pop("num_nextn_predict_layers")',
    'ok = "n_routed_experts" in base.config',
    'activation_bytes({"hidden_size": 6144}, 1, 2)',
    'h = model.config.num_attention_heads',
    'cfg["first_k_dense_replace"] = 0',
    'mt = art.config.get("model_type")',
])
def test_the_check_catches_a_read(line, keys):
    assert config_reads(line, keys), line


@pytest.mark.parametrize("line", [
    'qc = config.get("quantization_config")',
    'archs = self.config.get("architectures")',
    'task = cfg["task"]',
    'n = spec.hidden_size',
    'w = index["weight_map"]',
])
def test_the_check_lets_other_keys_pass(line, keys):
    assert not config_reads(line, keys), line


def test_a_planted_read_fails_the_check_on_a_copy_of_src(tmp_path, keys):
    """The check the real test runs, on a copy of src with one read planted in calib/plan.py: it fails, naming
    the line (and the unplanted copy passes)."""
    copy = tmp_path / "src" / "mtpquant"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert offenders(copy, keys) == []
    plan = copy / "calib" / "plan.py"
    lines = plan.read_text().splitlines()
    lines.append('HEADS = {"x": 1}.get("num_attention_heads", 64)')
    plan.write_text("\n".join(lines) + "\n")
    assert offenders(copy, keys) == [f"src/mtpquant/calib/plan.py:{len(lines)}: 'num_attention_heads'"]
