# tritonpilot sidecar image. Triton itself runs in its own container (the NGC
# tritonserver image, which has the PyTorch backend) in the same pod; the
# sidecar reaches it on localhost. See deploy/kubernetes/ and docs/container.md.
#
#   docker build -t tritonpilot --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Everything installed comes from requirements.lock (exact versions and sha256
# hashes; regenerate it with scripts/lock). BASE must be a Debian-like image with
# python3.11 (and its venv module) and useradd; the default is the official one.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
RUN python3 -m venv /opt/tritonpilot
COPY requirements.lock ./
# Every runtime dependency, and setuptools for the wheel below, at its locked
# version and checked against its locked hashes. Wheels only: no compiler here.
RUN /opt/tritonpilot/bin/pip install --no-cache-dir --disable-pip-version-check \
        --require-hashes --only-binary=:all: -r requirements.lock
# Exactly what the wheel build reads (see [tool.setuptools] in pyproject.toml).
COPY pyproject.toml README.md ./
COPY tritonpilot ./tritonpilot
COPY proxy ./proxy
COPY control ./control
COPY deploy ./deploy
# tritonpilot's own wheel, built by the locked setuptools (no build isolation, so
# nothing unlocked is fetched) and installed without dependencies (all are
# installed above); pip check fails the build if the lock misses one.
RUN /opt/tritonpilot/bin/pip wheel --no-cache-dir --disable-pip-version-check \
        --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/tritonpilot/bin/pip install --no-cache-dir --disable-pip-version-check \
        --no-deps /wheels/tritonpilot-*.whl \
    && /opt/tritonpilot/bin/pip check

FROM ${BASE}
# VERSION: keep equal to [project] version in pyproject.toml (tests/test_container.py checks).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="tritonpilot" \
      org.opencontainers.image.description="Sidecar in front of NVIDIA Triton Inference Server: a gRPC proxy that measures traffic and tunes instance counts and PyTorch-backend flags while it serves" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="NOASSERTION"
RUN useradd --uid 10001 --user-group --create-home --no-log-init tritonpilot
COPY --from=build /opt/tritonpilot /opt/tritonpilot
COPY deploy/policy.example.yaml /etc/tritonpilot/policy.yaml
# Defaults for `tritonpilot serve` options (TRITONPILOT_<OPTION>); override with -e.
ENV PATH="/opt/tritonpilot/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRITONPILOT_POLICY=/etc/tritonpilot/policy.yaml \
    TRITONPILOT_LISTEN=0.0.0.0:8101 \
    TRITONPILOT_HTTP_LISTEN=0.0.0.0:8100 \
    TRITONPILOT_METRICS_LISTEN=0.0.0.0:9101 \
    TRITONPILOT_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/tritonpilot
# 8100: HTTP/REST for clients; 8101: gRPC for clients; 9101: /metrics /healthz /readyz /status
EXPOSE 8100 8101 9101
# No curl in the slim image: python's urllib, on the port TRITONPILOT_METRICS_LISTEN names.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; port = os.environ.get('TRITONPILOT_METRICS_LISTEN', ':9101').rpartition(':')[2]; urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=4)"]
ENTRYPOINT ["tritonpilot", "serve"]
