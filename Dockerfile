# syntax=docker/dockerfile:1
#
# lstmd: the streaming inference daemon (`lstmd run`) as a slim, non-root image.
#
#   docker build -t lstmd:0.1.0 .
#   docker run --read-only --tmpfs /tmp --env-file lstmd.env \
#       -v "$PWD/models:/models:ro" -p 9102:9102 lstmd:0.1.0
#
# Dependencies come from requirements.lock (linux x86_64, CPython 3.11, every file
# pinned by hash; `make lock` regenerates it from pyproject.toml). The image is
# built for linux/amd64 only: the lock pins the tensorflow-cpu wheel, which exists
# for x86_64 Linux only. See docs/runbook.md.
#
# The image holds the runtime only: .dockerignore leaves daemon/devtools/ (the local
# Kafka broker, demo, bench) out of the build context, so `lstmd` in the image has
# run and replay, and its development commands' entry point is skipped.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with the locked dependencies and the lstmd package ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/lstmd
# The lock first: this layer (TensorFlow, ~600 MB) is rebuilt only when the lock changes.
# It holds the librdkafka extra too (confluent-kafka: LSTMD_KAFKA_CLIENT=confluent-kafka).
COPY requirements.lock ./
RUN /opt/lstmd/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY daemon ./daemon
# --no-deps: every dependency is already installed, from the lock, with its hash checked.
RUN /opt/lstmd/bin/pip install --no-cache-dir --no-deps . \
    && /opt/lstmd/bin/python -m compileall -q /opt/lstmd/lib \
    && /opt/lstmd/bin/lstmd --version

# ---- runtime: no compilers, no pip cache, no source tree; runs as 10001 ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="lstmd" \
      org.opencontainers.image.description="Kafka streaming inference daemon for stateful recurrent Keras models" \
      org.opencontainers.image.licenses="Apache-2.0"
# tini as PID 1: it forwards SIGTERM to the daemon (which then finishes its batch,
# publishes, commits and exits 0) and reaps zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 lstmd \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lstmd
COPY --from=build /opt/lstmd /opt/lstmd
# Read-only root file system: everything that writes goes under /tmp, which
# Kubernetes mounts as an emptyDir (docker: --tmpfs /tmp). Bytecode is precompiled
# at build time, so nothing is written next to the sources.
ENV PATH=/opt/lstmd/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    KERAS_HOME=/tmp/.keras \
    KERAS_BACKEND=tensorflow \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LSTMD_MODEL_PATH=/models/model.keras
WORKDIR /tmp
USER 10001:10001
EXPOSE 9102
# Docker only (Kubernetes uses the probes in deploy/): the poll loop is alive.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('LSTMD_HTTP_PORT', '9102'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "lstmd"]
CMD ["run"]
