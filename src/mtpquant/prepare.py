"""`prepare`: put the base BF16 checkpoint named by a model recipe into the run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtpquant import recipes
from mtpquant.errors import MtpquantError
from mtpquant.recipes import UNPINNED, ModelRecipe


def prepare(model_ref: str, dest: Path) -> dict[str, Any]:
    path = recipes.resolve_path("models", model_ref)
    recipe: ModelRecipe = recipes.load("models", path)
    src = recipe.source
    if src.fixture is not None:
        from mtpquant.fixture import write_fixture

        write_fixture(recipe.family, src.fixture, dest)
    elif src.path is not None:
        local = Path(src.path) if Path(src.path).is_absolute() else recipes.REPO_ROOT / src.path
        if not local.is_dir():
            raise MtpquantError(f"{path}: source.path {src.path} is not a directory")
        if dest.is_symlink():
            dest.unlink()
        elif dest.exists():
            raise MtpquantError(f"{dest}: exists and is not a link to a local source; remove it first")
        os.symlink(local.resolve(), dest)
    else:
        if src.revision == UNPINNED:
            raise MtpquantError(f"{path}: source.revision is UNPINNED; set it to the 40-hex commit of "
                                f"{src.hub} you audited before downloading")
        from huggingface_hub import snapshot_download

        snapshot_download(src.hub, revision=src.revision, local_dir=dest,
                          allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
    return {"stage": "prepare", "recipe": str(path), "sha256": recipes.recipe_sha256("models", path),
            "family": recipe.family, "source": {"hub": src.hub, "revision": src.revision, "path": src.path,
                                                "fixture": src.fixture is not None}, "output": str(dest)}
