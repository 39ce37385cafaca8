# syntax=docker/dockerfile:1
#
# Two images from one file:
#
#   docker build --target operator -t ghcr.io/ulmfit-operator/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/ulmfit-operator/trainer:0.1.0 .
#
# `operator` is the controller: slim Python with the `operator` extra only (no torch).
# `trainer` is what trainer pods run: CUDA + torch + transformers + DeepSpeed + Ray Tune.
#
# Both targets install the project into /opt/venv the same way, with one script that they
# run twice, docker/install-python-project.sh (ENV EXTRAS names the extras): first
# `dependencies`, the requirements named in pyproject.toml, in a layer that depends on
# pyproject.toml, requirements.lock and the script alone; then, after the source is copied,
# `project`, the project itself. Editing the source reinstalls only the project. requirements.lock
# constrains both: every distribution is at the version it pins, as in `make env`.
#
# pip reads two optional build secrets, mounted for its commands only and kept out of every layer:
# `pip.conf` (becomes /etc/pip.conf: an index mirror, timeouts) and `pip-ca.crt` (a CA bundle that
# pip.conf can name as `cert = /run/secrets/pip-ca.crt`), e.g.
#
#   docker build --secret id=pip.conf,src=pip.conf --secret id=pip-ca.crt,src=ca.crt ...

# Base images are pinned by release tag; pin them by digest too (a tag of the form
# `3.12.10-slim-bookworm@sha256:...`) where your registry policy asks for it. The build args
# replace them where those images cannot be pulled: the test cluster builds both targets on a
# Debian image that it makes itself (tests/cluster/images.py), with TRAINER_PYTHON naming that
# image's Python packages.
ARG PYTHON_IMAGE=python
ARG PYTHON_TAG=3.12.10-slim-bookworm
ARG TRAINER_IMAGE=nvidia/cuda
ARG TRAINER_TAG=12.8.1-cudnn-runtime-ubuntu24.04
ARG TRAINER_PYTHON=python3.12

# ----------------------------------------------------------------------------- operator

FROM ${PYTHON_IMAGE}:${PYTHON_TAG} AS python-base

FROM python-base AS operator-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXTRAS=operator
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml requirements.lock docker/install-python-project.sh ./
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca.crt \
    sh install-python-project.sh dependencies
COPY README.md ./
COPY operator ./operator
COPY trainer ./trainer
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca.crt \
    sh install-python-project.sh project

FROM python-base AS operator
LABEL org.opencontainers.image.title="ulmfit-operator" \
      org.opencontainers.image.description="Kubernetes operator for ULMFiT-style text classifiers" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
COPY --from=operator-build /opt/venv /opt/venv
# A numeric user, so `runAsNonRoot` can be verified without a passwd entry.
USER 65532:65532
EXPOSE 8080 8081
# Docker and Compose use this; Kubernetes ignores it and uses the Deployment's probes, which ask
# the same endpoint (kopf's liveness endpoint on the health port).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=4)"]
ENTRYPOINT ["ulmfit", "operator"]

# ------------------------------------------------------------------------------ trainer

FROM ${TRAINER_IMAGE}:${TRAINER_TAG} AS trainer-base
ARG TRAINER_PYTHON
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu's security updates replace package versions in place, so exact pins would break the
# build within weeks; the base image tag pins the distribution release instead. wget: KubeRay's
# health probes of Ray pods (sweeps with `backend: rayjob`) run it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        "$TRAINER_PYTHON" "$TRAINER_PYTHON-venv" ca-certificates wget \
    && rm -rf /var/lib/apt/lists/*

FROM trainer-base AS trainer
ARG TRAINER_PYTHON
# TORCH_VERSION is the version requirements.lock pins (a test keeps them equal). By default torch
# comes from pip's own configured index, where the lock was resolved, so that version exists; its
# wheel brings its own CUDA runtime (nvidia-* wheels), newer than some drivers support. For such a
# node pool set TORCH_INDEX_URL to a PyTorch index of an older CUDA release that has
# TORCH_VERSION; the nvidia-* wheels it brings are then left as they are.
ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX_URL=
LABEL org.opencontainers.image.title="ulmfit-trainer" \
      org.opencontainers.image.description="ULMFiT training stages: torch, transformers, DeepSpeed, Ray Tune" \
      org.opencontainers.image.licenses="Apache-2.0"
# One stage, not a build stage whose /opt/venv is copied: the environment is several GB (torch
# and its CUDA wheels), and a copy would hold it twice in every builder's storage.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    TRITON_CACHE_DIR=/tmp/triton \
    EXTRAS=trainer
RUN "$TRAINER_PYTHON" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, so the dependencies below find it installed (pinned by TORCH_VERSION; the linter
# misreads the optional index flag before it).
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca.crt \
    pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
COPY pyproject.toml requirements.lock docker/install-python-project.sh ./
# A C++ compiler and Python's headers for this step only: DeepSpeed's CPU shared-memory op is
# compiled into DeepSpeed here (DS_BUILD_SHM_COMM, against the installed torch, for the CPU
# accelerator) instead of at the first step of each CPU stage, and they are purged in the same
# layer, so the image carries no compiler. The DS_* settings are this step's alone: an image-wide
# DS_ACCELERATOR=cpu would keep DeepSpeed off the GPUs. Ubuntu's security updates replace package versions in
# place (see trainer-base).
# hadolint ignore=DL3008
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca.crt \
    apt-get update \
    && apt-get install -y --no-install-recommends g++ "$TRAINER_PYTHON-dev" \
    && NO_BUILD_ISOLATION=deepspeed DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu \
        sh install-python-project.sh dependencies \
    && apt-get purge -y --auto-remove g++ "$TRAINER_PYTHON-dev" \
    && rm -rf /var/lib/apt/lists/*
COPY README.md ./
COPY operator ./operator
COPY trainer ./trainer
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf --mount=type=secret,id=pip-ca.crt \
    sh install-python-project.sh project
USER 65532:65532
WORKDIR /tmp
# No HEALTHCHECK: a trainer container is a batch process, not a server. Its liveness is judged
# by the operator from the `progress.json` it writes to the store (runPolicy.progressDeadlineSeconds
# restarts a stage whose progress stops), which a probe inside the container cannot see.
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "ulmfit_trainer"]
