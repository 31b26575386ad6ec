"""`preflight`: refuse, before anything starts, a real run this machine cannot finish."""

from __future__ import annotations

from mtpquant.core.errors import MtpquantError
from mtpquant.model import recipes
from mtpquant.model.recipes import UNPINNED


def preflight(model_ref: str, calib_ref: str) -> list[str]:
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise MtpquantError("no CUDA GPU visible: the real artifact needs GPUs (8xH200 in the seed); "
                            "`make demo` runs the same chain on tiny models on this CPU")
    mpath = recipes.resolve_path("models", model_ref)
    model = recipes.load("models", mpath)
    if model.source.hub and model.source.revision == UNPINNED:
        raise MtpquantError(f"{mpath}: source.revision is UNPINNED; pin the audited 40-hex commit first")
    if model.source.hub:
        from mtpquant.chain import hub

        lock = hub.read_lock(hub.lock_for(model))
        hub.check_lock_matches(lock, model.source.hub, model.source.revision, mpath)
    cpath = recipes.resolve_path("calibration", calib_ref)
    calib = recipes.load("calibration", cpath)
    for i, s in enumerate(calib.sources):
        if s.hub and s.revision == UNPINNED:
            raise MtpquantError(f"{cpath}: sources[{i}].revision is UNPINNED ({s.hub}); pin it first")
    return [f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}", f"model {model.source.hub}@{model.source.revision}"]
