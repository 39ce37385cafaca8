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
# Layer order keeps rebuilds cheap: the dependencies named in pyproject.toml are installed in a
# layer that depends on pyproject.toml alone, so editing the source reinstalls only the project.

# Prints the requirements of the core package plus the extras named in $EXTRAS (comma-separated),
# read from pyproject.toml, so dependencies install before the source is copied.
ARG READ_REQUIREMENTS="import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *(r for e in os.environ['EXTRAS'].split(',') for r in p['optional-dependencies'][e]), sep=chr(10))"

# ----------------------------------------------------------------------------- operator

# Base images are pinned by release tag; pin them by digest too (`image:tag@sha256:...`) where
# your registry policy asks for it.
FROM python:3.12.10-slim-bookworm AS python-base

FROM python-base AS operator-build
ARG READ_REQUIREMENTS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXTRAS=operator
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "$READ_REQUIREMENTS" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY operator ./operator
COPY trainer ./trainer
# The project itself, from the copied source: there is no version to pin (its dependencies
# are already installed, from pyproject.toml, in the layer above).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[operator]"

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

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS trainer-base
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu's security updates replace package versions in place, so exact pins would break the
# build within weeks; the base image tag pins the distribution release instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM trainer-base AS trainer-build
ARG READ_REQUIREMENTS
# torch from the PyTorch index for the CUDA release of the base image (the PyPI wheel targets a
# newer CUDA than some drivers support).
ARG TORCH_VERSION=2.7.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXTRAS=trainer \
    DS_BUILD_OPS=0
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
COPY pyproject.toml ./
RUN python -c "$READ_REQUIREMENTS" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY operator ./operator
COPY trainer ./trainer
# The project itself, from the copied source: there is no version to pin (its dependencies
# are already installed, from pyproject.toml, in the layer above).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[trainer]"

FROM trainer-base AS trainer
LABEL org.opencontainers.image.title="ulmfit-trainer" \
      org.opencontainers.image.description="ULMFiT training stages: torch, transformers, DeepSpeed, Ray Tune" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    TRITON_CACHE_DIR=/tmp/triton
COPY --from=trainer-build /opt/venv /opt/venv
USER 65532:65532
WORKDIR /tmp
# No HEALTHCHECK: a trainer container is a batch process, not a server. Its liveness is judged
# by the operator from the `progress.json` it writes to the store (runPolicy.progressDeadlineSeconds
# restarts a stage whose progress stops), which a probe inside the container cannot see.
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "ulmfit_trainer"]
