"""An image's labels record every lock it was built from: which locks a flavour consumes, their sha256 now, and
the labels a Dockerfile gives for a flavour's build args (so a label that is missing is caught before a build)."""

from __future__ import annotations

import re
from pathlib import Path

from mtpquant.core.checkpoint import file_sha256
from mtpquant.images.pins import FLAVOURS, PINNED

LOCK_LABEL = "io.mtpquant.lock.sha256"
KERNELS_LABEL = "io.mtpquant.kernels.sha256"
BUILD_LOCK_LABEL = "io.mtpquant.build-lock.sha256"


def lock_files(image: str, flavour: str) -> dict[str, str]:
    """{label: pinned file} for every lock a build of (image, flavour) consumes."""
    fl = FLAVOURS[image][flavour]
    out = {LOCK_LABEL: f"{fl.lock}.txt"}
    if fl.kernels or fl.toolchain:  # the sources compiled, or the CUDA version of the toolchain
        out[KERNELS_LABEL] = "kernels.lock"
    if fl.kernels:
        out[BUILD_LOCK_LABEL] = "serve-cuda-build.txt"
    return out


def label_problems(labels: dict[str, str], image: str, flavour: str, pinned: Path = PINNED) -> list[str]:
    """One line per lock whose sha256 the labels do not record as it is in pinned/ now."""
    problems = []
    for label, name in lock_files(image, flavour).items():
        want, got = file_sha256(pinned / name), (labels or {}).get(label)
        if got != want:
            problems.append(f"{image}/{flavour}: label {label} is {got or 'missing'}, pinned/{name} is {want}")
    return problems


_ARG = re.compile(r"\$\{(\w+)\}")
_PAIR = re.compile(r'([\w.\-]+)="([^"]*)"')


def dockerfile_labels(dockerfile: Path, buildargs: dict[str, str]) -> dict[str, str]:
    """The labels the Dockerfile's last stage sets, its ${ARG}s filled from buildargs (unset: empty)."""
    text = re.sub(r"\\\n", " ", Path(dockerfile).read_text())
    stages = re.split(r"(?m)^FROM\s", text)
    labels: dict[str, str] = {}
    for line in stages[-1].splitlines():
        if line.startswith("LABEL "):
            for key, value in _PAIR.findall(line):
                labels[key] = _ARG.sub(lambda m: buildargs.get(m.group(1), ""), value)
    return labels
