"""The package layout shows the architecture: each domain subpackage imports only the domains below it (its
docstring says which), so a change low in the stack never needs a module above it. Lazy imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import mtpquant

PKG = Path(mtpquant.__file__).parent
# a domain -> the domains it may import (besides itself); cli/__main__ on top may import all
ALLOWED = {
    "core": set(),
    "pins": set(),
    "model": {"core", "pins"},
    "tiny": {"core", "model"},
    "calib": {"core", "pins", "model"},
    "chain": {"core", "pins", "model", "tiny"},
    "serving": {"core", "pins", "model", "chain"},
    "images": {"core", "pins"},
}


def imported_domains(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mtpquant" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_every_module_lives_in_a_domain():
    flat = sorted(p.name for p in PKG.glob("*.py") if p.name not in {"__init__.py", "__main__.py", "cli.py"})
    assert flat == [], f"modules outside a domain subpackage: {flat}"
    domains = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert domains == set(ALLOWED), domains ^ set(ALLOWED)


def test_imports_only_point_down():
    bad = []
    for domain, allowed in ALLOWED.items():
        for path in sorted((PKG / domain).rglob("*.py")):
            for used in imported_domains(path) - allowed - {domain}:
                bad.append(f"{path.relative_to(PKG)} imports mtpquant.{used}")
    assert bad == []


def test_each_domain_says_what_it_owns_and_may_import():
    for domain, allowed in ALLOWED.items():
        doc = ast.get_docstring(ast.parse((PKG / domain / "__init__.py").read_text())) or ""
        assert "Imports:" in doc, domain
        words = doc.split("Imports:")[1].replace(",", " ").split()
        said = {w.split(".")[1] for w in words if w.startswith("mtpquant.")}
        assert said == allowed, (domain, said, allowed)
