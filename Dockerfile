# syntax=docker/dockerfile:1
# Build: docker build -t lstmd .   Run: docker run --env-file lstmd.env lstmd
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN python -m venv /opt/lstmd && /opt/lstmd/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/lstmd /opt/lstmd
ENV PATH=/opt/lstmd/bin:$PATH TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 9102
# tini is PID 1 so SIGTERM reaches the daemon, which then flushes, commits and exits 0.
ENTRYPOINT ["/usr/bin/tini", "--", "lstmd"]
CMD ["run"]
