"""The images package imports only downward (pins <- context <- daemon <- reproducible <- engine <- cli: no
cycle), and the 40-hex commit pattern is defined once in the package."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mtpquant"
ORDER = ["pins", "context", "daemon", "reproducible", "engine", "cli"]


def imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_images_modules_import_only_downward():
    for i, name in enumerate(ORDER):
        deps = {m for m in imported(SRC / "images" / f"{name}.py") if m.startswith("mtpquant.images")}
        assert "mtpquant.images" not in deps, f"images/{name}.py imports the package itself"
        above = {f"mtpquant.images.{n}" for n in ORDER[i:]}
        assert not deps & above, f"images/{name}.py imports {sorted(deps & above)} (same level or above)"
    assert not (SRC / "reproducible.py").exists() and not (SRC / "images.py").exists()


def test_sha40_is_defined_once():
    """Once in the package; kernels.py keeps its own copy because it runs alone in the image (next test)."""
    defined = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if re.search(r"\{40\}", p.read_text()))
    assert defined == ["pins/kernels.py", "pins/locks.py"], defined


def test_kernels_script_runs_alone(tmp_path):
    """The serving Dockerfile copies kernels.py to /tmp and runs it with the build venv's python: no mtpquant."""
    script = tmp_path / "kernels.py"
    shutil.copy(SRC / "pins" / "kernels.py", script)
    r = subprocess.run([sys.executable, "-I", str(script), "plan", str(SRC.parents[1] / "pinned" / "kernels.lock")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert {m.split(".")[0] for m in imported(SRC / "pins" / "kernels.py")} <= set(sys.stdlib_module_names)
