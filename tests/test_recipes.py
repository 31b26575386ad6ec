from pathlib import Path

import pytest

from mtpquant.model import recipes
from mtpquant.model.recipes import RECIPES_DIR, RecipeError


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_loads(path: Path):
    obj = recipes.load(path.parent.name, path)
    assert obj.name == path.stem


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


QUANT = (RECIPES_DIR / "quant" / "w4a16-asym-g128.yaml").read_text()


@pytest.mark.parametrize("kind,text,expected", [
    ("quant", QUANT + "\nbogus: 1\n", "bad.yaml: unknown key 'bogus'"),
    ("quant", QUANT.replace("block_size: 128", "block_size: big"), "bad.yaml: gptq.block_size: must be int"),
    ("quant", QUANT.replace("scheme: w4a16-asym-g128", "scheme: w4a16-asym-g100"),
     "bad.yaml: gptq.scheme: unknown scheme 'w4a16-asym-g100'; known: w4a16-asym-g128, "),
    ("quant", QUANT.replace("moe_calibrate_all_experts: true", "moe_calibrate_all_experts: false"),
     "moe_calibrate_all_experts: must be true"),
    ("quant", QUANT.replace("targets: [routed_experts]", "targets: [Linear]"), "gptq.targets: 'Linear' must be"),
    ("quant", QUANT.replace("scheme: w4a16-asym-g128", "scheme: [4, 128]"), "gptq.scheme: must be str"),
    ("quant", QUANT.replace("name: w4a16-asym-g128\n", ""), "bad.yaml: name: missing required key"),
    ("models", "name: x\nfamily: llama\nsource: {path: /tmp}\n", "bad.yaml: family: 'llama' is not one of"),
    ("models", "name: x\nfamily: glm4_moe\nsource: {hub: a/b, revision: main}\n",
     "source.revision: must be a 40-hex commit SHA"),
    ("models", "name: x\nfamily: glm4_moe\nsource: {hub: a/b, path: /x, revision: UNPINNED}\n",
     "give exactly one of hub, path, fixture"),
    ("models", "name: x\nfamily: glm4_moe\nsource: {fixture: {hidden_size: 200}}\n", "multiples of 128"),
    ("calibration", "name: c\nnum_samples: 4\nmax_seq_length: 8\nsources:\n  - {local: nope.jsonl, "
     "text_field: text, weight: 1}\n", "sources[0].local: file not found: nope.jsonl"),
    ("calibration", "name: c\nnum_samples: 4\nmax_seq_length: 8\nsources: [{hub: a/b, revision: UNPINNED, "
     "weight: 1}]\n", "give exactly one of text_field, messages_field"),
    ("quant", "gptq: [1, 2\n", "bad.yaml: invalid YAML at line"),
    ("quant", QUANT.replace("token_chunk: 16384", "token_chunk: 0"), "bad.yaml: fast_experts.token_chunk: must be > 0"),
    ("quant", QUANT.replace("hessian_inputs: bf16", "hessian_inputs: fp16"),
     "fast_experts.hessian_inputs: 'fp16' is not one of"),
    ("quant", QUANT.replace("solve_rows: 131072", "solve_rows: 131072\n  bogus: 1"),
     "bad.yaml: fast_experts: unknown key 'bogus'"),
    ("quant", QUANT.replace("pipeline: sequential", "pipeline: basic"), "fast_experts: needs pipeline: sequential"),
    ("models", "name: x\nfamily: glm4_moe\nsource: {path: /tmp}\nconfig: [1]\n", "bad.yaml: config: must be a mapping"),
])
def test_bad_recipe_names_file_and_key(tmp_path, kind, text, expected):
    with pytest.raises(RecipeError) as exc:
        recipes.load(kind, write(tmp_path, text))
    msg = str(exc.value)
    assert expected in msg
    assert "\n" not in msg


def test_missing_recipe_file_is_one_line_error():
    with pytest.raises(RecipeError, match=r"no-such\.yaml: recipe file not found"):
        recipes.load("quant", "no-such")
