"""Build, tag, publish, pull and run the project's images with the Docker SDK (legacy builder: no BuildKit).

An image is (name, flavour): calibrate|serve x cpu|cuda, built from containers/<name>.Dockerfile. Its build args
come from pinned/images.lock (base digests), pinned/<lock>.txt (hash), pinned/kernels.lock (serve/cuda) and
pins.FLAVOURS. Its tag is a hash of everything that goes in (the context's files and the build args), so one
tag names one content: `pull` fetches the published digest only when its tag matches the working tree's.

Modules, each importing only those above it: pins (the inputs), context (files, tag, BuildSpec, context tar,
plan), daemon (the engine connection), reproducible (normalize and diff images), engine (build, push, pull,
run), cli (`python -m mtpquant.images {build,push,pull,run,tag,plan} [options] [-- COMMAND for run]`).

Imports: mtpquant.core, mtpquant.pins.
"""

from mtpquant.images.cli import main
from mtpquant.images.context import (
                                     content_tag,
                                     context_entries,
                                     context_files,
                                     fill_wheelhouse,
                                     hashed,
                                     plan_lines,
                                     revision,
                                     spec,
                                     write_context,
)
from mtpquant.images.daemon import client
from mtpquant.images.engine import build, drop_build_cache, exists, publish, pull, push, run
from mtpquant.images.pins import (
                                     CONTAINERS,
                                     FLAVOURS,
                                     NAMESPACE,
                                     PINNED,
                                     ROOT,
                                     SOURCE_DATE_EPOCH,
                                     UBUNTU_SNAPSHOT,
                                     WHEELHOUSE,
                                     BuildSpec,
                                     Flavour,
                                     base_ref,
                                     load_images_lock,
)

__all__ = ["CONTAINERS", "FLAVOURS", "NAMESPACE", "PINNED", "ROOT", "SOURCE_DATE_EPOCH", "UBUNTU_SNAPSHOT",
           "WHEELHOUSE", "BuildSpec", "Flavour", "base_ref", "build", "client", "content_tag", "context_entries",
           "context_files", "drop_build_cache", "exists", "fill_wheelhouse", "hashed", "load_images_lock", "main",
           "plan_lines", "publish", "pull", "push", "revision", "run", "spec", "write_context"]
