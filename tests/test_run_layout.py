"""mtpquant.core.run owns the run directory: no other module spells a name in it, and each record has one writer."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from mtpquant.core.run import RECORDS, Run, manifest_of

SRC = Path(__file__).resolve().parents[1] / "src" / "mtpquant"
OWNER = SRC / "core" / "run.py"

# File names and name templates of the run layout (f-string fields written as {}): wrong in any string
# literal but run.py's, docstrings aside.
FILES = ("prepare.json", "quantize.json", "inject-mtp.json", "verify.json", "serve.json", "manifest.json",
         "report.md", "bench.json", "bench.md", "bench.png")
TEMPLATES = ("{}.json", "{}-c{}-r{}.json", "serve-bf16-{}", "serve-{}.log", "serve-{}-{}.log")
# Directory names of the layout that are also ordinary words: wrong as a path component (`x / "base"`,
# `Path(x, "base")`, `x.joinpath("base")`).
DIRS = ("base", "quantized", "artifact", "eval", "bench")
# Same spelling, other things: (module, literal) -> why.
ALLOWED = {
    ("reproducible.py", "manifest.json"): "the manifest of a `docker save` image archive",
    ("reproducible.py", "{}.json"): "an image config blob of a `docker save` archive",
}


def _text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with each replacement field as {}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _not_checked(tree: ast.Module) -> set[int]:
    """Docstrings, and the pieces of f-strings (each f-string is checked as a whole)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
        if isinstance(node, ast.JoinedStr):
            out.update(id(v) for v in node.values)
    return out


def _is_path_join(node: ast.AST) -> list[ast.AST]:
    """The operands of a path join: `a / b`, `Path(a, b)`, `a.joinpath(b)`, `os.path.join(a, b)`."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return [node.left, node.right]
    if isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name in ("Path", "PurePath", "joinpath", "join"):
            return list(node.args)
    return []


def _file_hit(text: str) -> str | None:
    for name in FILES:
        if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text):
            return name
    return text if text in TEMPLATES else None


def layout_literals(source: str, module: str) -> list[tuple[int, str]]:
    """(line, literal) of every run-layout name spelled in `source`."""
    tree = ast.parse(source)
    skip = _not_checked(tree)
    hits = []
    for node in ast.walk(tree):
        for operand in _is_path_join(node):
            if _text(operand) in DIRS:
                hits.append((operand.lineno, _text(operand)))
        text = _text(node)
        if text is None or id(node) in skip:
            continue
        name = _file_hit(text)
        if name and (module, name) not in ALLOWED:
            hits.append((node.lineno, name))
    return sorted(set(hits))


def test_no_module_but_run_spells_a_run_dir_name():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path == OWNER:
            continue
        rel = path.relative_to(SRC.parent.parent)
        found += [f"{rel}:{line}: {lit!r}" for line, lit in layout_literals(path.read_text(), path.name)]
    assert not found, "run-dir names belong to mtpquant.core.run (ask Run for the path):\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    'p = run / "quantize.json"',
    'p = Path(args.run) / "base"',
    'p = Path(args.run, "artifact")',
    'p = run.joinpath("eval") / f"{label}.json"',
    'p = run / f"serve-bf16-{artifact.name}"',
    'p = out / f"{tag}-c{c}-r{r}.json"',
    'print(f"wrote {art / \'manifest.json\'}")',
    'md = "![plot](bench/bench.png)"',
    'p = run / f"{stage}.json"',
])
def test_the_check_catches_a_spelled_path(line):
    assert layout_literals(line, "cli.py"), line


@pytest.mark.parametrize("line", [
    'recipes.load("eval", ref)',
    'x = {"base": str(base.root)}',
    '"""Writes RUN/quantize.json."""',
    'p = base / "config.json"',
])
def test_the_check_lets_other_uses_of_the_words_pass(line):
    assert not layout_literals(line, "cli.py"), line


def test_the_checked_names_are_the_layout_of_run_py():
    owner = OWNER.read_text()
    records = {f"{s}.json" for s in RECORDS}
    for lit in (*FILES, *DIRS):
        assert f'"{lit}"' in owner or lit in records, lit
    assert records <= set(FILES)
    spelled = {lit for _, lit in layout_literals(owner, "run.py")}
    assert set(TEMPLATES) <= spelled, set(TEMPLATES) - spelled


def test_record_writes_once_and_reads_back(tmp_path):
    run = Run(tmp_path / "r")
    assert run.read_record("verify") is None
    path = run.record("verify", {"stage": "verify", "ok": True})
    assert path == tmp_path / "r" / "verify.json"
    assert json.loads(path.read_text()) == {"stage": "verify", "ok": True}
    assert run.read_record("verify") == {"stage": "verify", "ok": True}
    assert [p.name for p in path.parent.iterdir()] == ["verify.json"]  # no temp file left
    assert {run.record_path(s).name for s in RECORDS} == {f"{s}.json" for s in RECORDS}
    with pytest.raises(ValueError, match="no record for stage 'bench'"):
        run.record_path("bench")


def test_the_layout_is_the_one_the_readme_and_users_know():
    run = Run("/r")
    got = {
        "base": run.base, "quantized": run.quantized, "artifact": run.artifact,
        "quantize": run.record_path("quantize"), "serve": run.record_path("serve"),
        "copy": run.serve_copy(Path("/elsewhere/artifact")), "serve_log": run.serve_log("m", False),
        "eval": run.eval_result("bf16"), "eval_log": run.eval_log("bf16"),
        "bench": run.bench_summary, "table": run.bench_table, "plot": run.bench_plot,
        "point": run.bench_point("mtp", 4, 2), "bench_log": run.bench_log("nomtp"), "report": run.report,
    }
    assert {k: str(v) for k, v in got.items()} == {
        "base": "/r/base", "quantized": "/r/quantized", "artifact": "/r/artifact",
        "quantize": "/r/quantize.json", "serve": "/r/serve.json",
        "copy": "/r/serve-bf16-artifact", "serve_log": "/r/serve-m-nomtp.log",
        "eval": "/r/eval/bf16.json", "eval_log": "/r/serve-bf16.log",
        "bench": "/r/bench/bench.json", "table": "/r/bench/bench.md", "plot": "/r/bench/bench.png",
        "point": "/r/bench/mtp-c4-r2.json", "bench_log": "/r/bench/serve-nomtp.log", "report": "/r/report.md",
    }
    assert str(manifest_of(run.artifact)) == "/r/artifact/manifest.json"
