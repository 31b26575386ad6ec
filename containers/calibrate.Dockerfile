# The calibration image: quantize, inject-mtp, verify, manifest (llm-compressor stack).
# One file, two flavours chosen by build args (`nox -s images` passes them from pinned/images.lock):
#   cpu  : a Debian bookworm base that has Python 3.11 (what CI, laptops and this project's tests use)
#   cuda : nvidia/cuda base-ubuntu24.04 (H100/H200); PyTorch's CUDA wheels carry their own CUDA libraries,
#          so this image needs no toolkit, only the driver the container runtime mounts.
# Legacy-builder compatible (no BuildKit syntax): CI has no BuildKit.
# Stages: base (OS + user) -> build (venv from the hashed lock) -> runtime (base + the venv, no pip cache,
# no wheelhouse, no compiler).

# Base images by digest only: NVIDIA deletes old CUDA tags, so a mirror's reference can be passed instead.
# Default: Docker Hub's python:3.11-slim-bookworm (Python 3.11 = the interpreter pinned/*.txt are resolved for).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# OS packages the runtime needs beyond the base (cuda: python3.12 + venv, which NVIDIA's CUDA base lacks).
# Empty for cpu: the base already has Python, so the cpu image runs no apt at all. Packages the base already has
# (the project's own Ubuntu base has them all) are not fetched.
ARG APT_PACKAGES=""
# Ubuntu snapshot (YYYYMMDDTHHMMSSZ) that apt resolves APT_PACKAGES against, so their versions are pinned too.
# Only Ubuntu's archive has snapshots: one-line sources (NVIDIA's cuda*.list in the CUDA images; nothing is
# installed from it) are set aside while apt runs against the snapshot.
# (hadolint cannot see inside the variable: `python -m mtpquant.pins.policy` checks each flavour's values.)
ARG APT_SNAPSHOT=""
# hadolint ignore=DL3008,SC2086
RUN missing=""; \
    for p in ${APT_PACKAGES}; do \
      dpkg-query -W -f='${Status} ${Version}\n' "${p%%=*}" 2>/dev/null \
        | grep -qx "install ok installed $(case "$p" in *=*) echo "${p#*=}";; *) echo '.*';; esac)" \
        || missing="${missing} ${p}"; \
    done; \
    if [ -n "${missing}" ]; then \
      { [ -z "${APT_SNAPSHOT}" ] || mv /etc/apt/sources.list.d/*.list /tmp/ 2>/dev/null || true; } \
      && apt-get update ${APT_SNAPSHOT:+--snapshot "${APT_SNAPSHOT}"} \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing} \
      && { mv /tmp/*.list /etc/apt/sources.list.d/ 2>/dev/null || true; } \
      && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /var/cache/ldconfig/aux-cache; \
    fi
# A fixed non-root user written straight into passwd/group: useradd would also stamp today's date into
# /etc/shadow, which makes two builds on different days differ. HOME is world-writable so that the
# `--user $(id -u)` of `--runtime docker` works for any UID.
RUN echo 'mtpquant:x:10001:10001:mtpquant:/home/mtpquant:/bin/sh' >> /etc/passwd \
    && echo 'mtpquant:x:10001:' >> /etc/group \
    && install -d -m 1777 /home/mtpquant /work
ENV HOME=/home/mtpquant \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8

FROM base AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The hashed lockfile this image installs (pinned/<LOCK>.txt): calibrate-cpu or calibrate-cuda.
ARG LOCK=calibrate-cpu
# sha256 of that lockfile; checked below so that the label that records it cannot lie.
ARG LOCK_SHA256
# Air-gapped by default: wheels come from containers/wheelhouse/<LOCK>/ (filled by `nox -s images`).
# PIP_NO_INDEX=0 lets pip fetch the same hashed files from PyPI (PIP_EXTRA_INDEX_URL for the CPU torch).
ARG PIP_NO_INDEX=1
ARG PIP_EXTRA_INDEX_URL=""
# pyc files are written with hash-based invalidation below; a fixed epoch keeps any tool that reads it stable.
ARG SOURCE_DATE_EPOCH=0
ENV PIP_NO_INDEX=${PIP_NO_INDEX} \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}
# Optional extra CA certificates (*.crt in containers/certs/) for networks that intercept TLS; used by this
# build stage only, never copied into the runtime image.
COPY containers/certs/ /tmp/certs/
COPY containers/wheelhouse/ /tmp/wheelhouse/
COPY pinned/${LOCK}.txt /tmp/lock.txt
RUN echo "${LOCK_SHA256}  /tmp/lock.txt" | sha256sum -c - \
    && { cat /etc/ssl/certs/ca-certificates.crt /tmp/certs/*.crt 2>/dev/null || true; } > /tmp/ca.crt \
    && if [ -s /tmp/ca.crt ]; then export PIP_CERT=/tmp/ca.crt; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile --no-deps --require-hashes \
         --find-links "/tmp/wheelhouse/${LOCK}" -r /tmp/lock.txt
# pyc files are compiled once here, hash-based (no source mtimes inside), as pip would but reproducibly; like
# pip, files that do not compile under this Python (torch's py312-only test helpers) are left as source.
# This project, editable so that its recipes/ and data/ resolve next to src/ (no deps: all came from the lock).
COPY pyproject.toml /opt/mtpquant/
COPY src/ /opt/mtpquant/src/
COPY recipes/ /opt/mtpquant/recipes/
COPY data/ /opt/mtpquant/data/
COPY pinned/ /opt/mtpquant/pinned/
RUN /opt/venv/bin/pip install --no-compile --no-deps --no-index --no-build-isolation -e /opt/mtpquant \
    && rm -rf /opt/mtpquant/build \
    && { python3 -m compileall -qq -j 0 --invalidation-mode unchecked-hash /opt/venv/lib /opt/mtpquant/src || true; }

FROM base AS runtime
ARG BASE_IMAGE
ARG LOCK=calibrate-cpu
ARG LOCK_SHA256
# The commit this image was built from (`git rev-parse HEAD`, "-dirty" when the tree had changes).
ARG REVISION=unknown
ARG FLAVOUR=cpu
COPY --from=build /opt/venv/ /opt/venv/
COPY --from=build /opt/mtpquant/ /opt/mtpquant/
LABEL org.opencontainers.image.title="mtpquant-calibrate-${FLAVOUR}" \
      org.opencontainers.image.description="mtpquant calibration stages (quantize, inject-mtp, verify, manifest)" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.mtpquant.flavour="${FLAVOUR}" \
      io.mtpquant.lock="pinned/${LOCK}.txt" \
      io.mtpquant.lock.sha256="${LOCK_SHA256}"
USER 10001:10001
WORKDIR /work
CMD ["python", "-m", "mtpquant", "--help"]
