# syntax=docker/dockerfile:1
#
# One image for the peftreg API (`peftreg serve`), the job worker
# (`peftreg worker`) and the maintenance commands (`db upgrade`, `gc`, `fsck`).
#
#   docker build -t peftreg:0.2.0 .
#   docker build --build-arg VARIANT=cuda -t peftreg:0.2.0-cuda .
#
# VARIANT selects the base image and the torch build:
#   cpu   a slim Python base and torch==$TORCH_VERSION+cpu
#   cuda  the NVIDIA CUDA "base" image (the environment the NVIDIA container
#         runtime keys on) and torch==$TORCH_VERSION+$CUDA_TAG; the torch
#         wheels bring their own CUDA libraries, the node brings the driver.
# TORCH_SPEC replaces the whole torch requirement. TORCH_INDEX_URL names the
# wheel index that serves that build (the +cpu and +cuXXX builds live on
# PyTorch's own indexes) and PACKAGE_INDEX_URL replaces the default package
# index (a mirror). Neither has a default: pass them with --build-arg.

ARG VARIANT=cpu
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${CPU_BASE_IMAGE} AS base-cpu
ENV PEFTREG_PYTHON=/usr/local/bin/python3

FROM ${CUDA_BASE_IMAGE} AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV PEFTREG_PYTHON=/usr/bin/python3

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# --- build: a virtual environment in /opt/venv -------------------------------
FROM base AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG CUDA_TAG=cu128
ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=""
ARG PACKAGE_INDEX_URL=""
RUN "$PEFTREG_PYTHON" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and pinned, in its own layer: it is the large one, and the
# package does not depend on it, so no resolver picks a build behind our back.
RUN set -eu; \
    case "$VARIANT" in \
        cpu) build=cpu ;; \
        cuda) build="$CUDA_TAG" ;; \
        *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 2 ;; \
    esac; \
    spec="${TORCH_SPEC:-torch==${TORCH_VERSION}+${build}}"; \
    pip install \
        ${PACKAGE_INDEX_URL:+--index-url "$PACKAGE_INDEX_URL"} \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "$spec"

# Everything else from the server lock (exact versions with hashes): the
# service, its PostgreSQL and S3 drivers, and the worker's transformers.
WORKDIR /src
COPY requirements/server.txt ./requirements/server.txt
RUN pip install ${PACKAGE_INDEX_URL:+--index-url "$PACKAGE_INDEX_URL"} \
        --require-hashes --no-deps -r requirements/server.txt
# `peftreg` is a link to client/, which links registry/ and migrations/ in.
COPY pyproject.toml README.md ./
COPY peftreg ./peftreg
COPY registry ./registry
COPY client ./client
COPY migrations ./migrations
RUN pip install ${PACKAGE_INDEX_URL:+--index-url "$PACKAGE_INDEX_URL"} --no-deps . \
    && pip check \
    && peftreg --version

# --- runtime ----------------------------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="peftreg" \
      org.opencontainers.image.description="Adapter registry for parameter-efficient fine-tuning (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 peftreg \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/peftreg --shell /usr/sbin/nologin peftreg \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/peftreg /var/lib/peftreg-work

COPY --from=build /opt/venv /opt/venv

# PEFTREG_HOST=0.0.0.0: a container is reached from outside, so anonymous
# access defaults to none (`auto` grants it on loopback binds only).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/var/lib/peftreg \
    PEFTREG_HOME=/var/lib/peftreg \
    PEFTREG_WORK_DIR=/var/lib/peftreg-work \
    PEFTREG_HOST=0.0.0.0 \
    PEFTREG_PORT=8750

# Numeric user, so Kubernetes can verify runAsNonRoot. The root filesystem
# may be mounted read-only: only PEFTREG_HOME, the work dir and /tmp are written.
USER 10001:10001
WORKDIR /var/lib/peftreg
EXPOSE 8750

# No HEALTHCHECK: the same image runs workers and one-off commands, which
# serve no HTTP; Kubernetes probes /healthz and /readyz on the API instead.
ENTRYPOINT ["peftreg"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8750"]
