# syntax=docker/dockerfile:1
# TERAN encoder service image: torch-free (pip install .[serve]), non-root, no HEALTHCHECK
# (Kubernetes uses native gRPC probes on grpc.health.v1). Build from the repository root:
#   docker build -f docker/encoder.Dockerfile -t registry.example.com/teran/encoder:0.1.0 .
# Pin the base further by digest (python:3.11.13-slim-bookworm@sha256:...) in your registry mirror.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# What the image holds is listed once, in .dockerignore (the build context).
COPY . .
RUN pip install ".[serve]" \
    && python -c "import encoder_service.__main__" \
    && ! python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 teran \
    && useradd --system --uid 10001 --gid teran --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin teran
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["python", "-m", "encoder_service"]
