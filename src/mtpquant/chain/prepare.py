"""`prepare`: put the base BF16 checkpoint named by a model recipe into the run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtpquant.core.errors import MtpquantError
from mtpquant.model import recipes
from mtpquant.model.recipes import UNPINNED, ModelRecipe


def _link(dest: Path, target: Path) -> None:
    """RUN/base as a link to a checkpoint that lives elsewhere (a local directory, the hub cache's snapshot)."""
    if dest.is_symlink():
        dest.unlink()
    elif dest.exists():
        raise MtpquantError(f"{dest}: exists and is not a link to a source checkpoint; remove it first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target.resolve(), dest)


def _from_hub(recipe: ModelRecipe, path: Path, dest: Path) -> dict[str, Any]:
    from mtpquant.chain import hub
    from mtpquant.core.checkpoint import file_sha256

    src = recipe.source
    if src.revision == UNPINNED:
        raise MtpquantError(f"{path}: source.revision is UNPINNED; set it to the 40-hex commit of "
                            f"{src.hub} you audited before downloading")
    lock = hub.read_lock(hub.lock_for(recipe))
    hub.check_lock_matches(lock, src.hub, src.revision, path)
    _link(dest, hub.download(src.hub, src.revision, lock))
    return hub.describe(lock) | {"lock_sha256": file_sha256(lock.path)}


def prepare(model_ref: str, dest: Path) -> dict[str, Any]:
    path = recipes.resolve_path("models", model_ref)
    recipe: ModelRecipe = recipes.load("models", path)
    src = recipe.source
    checked: dict[str, Any] = {}
    if src.fixture is not None:
        from mtpquant.core.progress import loading
        from mtpquant.tiny.fixture import write_fixture

        loading("prepare", "torch")  # the fixture's random weights
        write_fixture(recipe.family, src.fixture, dest)
    elif src.path is not None:
        local = Path(src.path) if Path(src.path).is_absolute() else recipes.REPO_ROOT / src.path
        if not local.is_dir():
            raise MtpquantError(f"{path}: source.path {src.path} is not a directory")
        _link(dest, local)
    else:
        checked = _from_hub(recipe, path, dest)
    return {"stage": "prepare", "recipe": str(path), "sha256": recipes.recipe_sha256("models", path),
            "family": recipe.family, "source": {"hub": src.hub, "revision": src.revision, "path": src.path,
                                                "fixture": src.fixture is not None, **checked},
            "output": str(dest)}
