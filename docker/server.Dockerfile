# The serving image: `conveyor serve` on ONNX Runtime, configured by CONVEYOR_* variables. No torch.
#
#   docker build -f docker/server.Dockerfile -t conveyor-server:0.1.0 .
#   docker run -v artifacts:/artifacts:ro -p 127.0.0.1:50051:50051 conveyor-server:0.1.0
#
# Without a registry or package index (docker-compose.offline.yml): --build-arg BASE_IMAGE=<a local image with
# python3 3.11 and venv> --build-arg PIP_OFFLINE=1, with docker/wheelhouse filled by scripts/fetch_wheelhouse.sh.
#
# Written for the classic builder as well as BuildKit (no RUN --mount, no heredocs), and ordered for the vfs
# storage driver, where every step copies the whole filesystem: metadata steps run on the small base, the venv
# arrives in one COPY at the end, and code changes rebuild only the last two steps of the builder.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The sources, gathered in a stage of their own so that the builder takes them in one step.
FROM ${BASE_IMAGE} AS source
COPY pyproject.toml README.m[d] /src/
COPY modelcard/ /src/modelcard/
COPY serving/ /src/serving/
COPY training/ /src/training/
COPY export/ /src/export/

# The requirements, read from pyproject.toml in a stage of their own: an edit elsewhere in pyproject.toml (tool
# settings) leaves requirements.txt, and so the builder's dependency layer, unchanged.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml scripts/pyproject_requirements.py /deps/
RUN python3 /deps/pyproject_requirements.py /deps/pyproject.toml >/deps/requirements.txt

FROM ${BASE_IMAGE} AS builder
ARG PIP_OFFLINE=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
COPY docker/wheelhouse/ /wheels/
COPY --from=requirements /deps/requirements.txt /deps/
# Dependencies first, from requirements.txt alone: this layer survives code changes.
RUN set -eu; \
    if [ "$PIP_OFFLINE" = 1 ]; then index="--no-index"; else index=""; fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install --quiet $index --find-links /wheels -r /deps/requirements.txt
COPY --from=source /src/ /src/
RUN set -eu; \
    if [ "$PIP_OFFLINE" = 1 ]; then index="--no-index"; else index=""; fi; \
    /opt/venv/bin/pip install --quiet --no-deps $index --find-links /wheels /src; \
    /opt/venv/bin/python -c "import serving.server.app, onnxruntime, grpc_health.v1"; \
    /opt/venv/bin/conveyor serve --help >/dev/null; \
    if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the server image" >&2; exit 1; fi; \
    find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
# A home of its own: ONNX Runtime (and matplotlib) keep small state files there, and warn without one.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/conveyor --shell /usr/sbin/nologin \
        conveyor \
    && mkdir -p /artifacts && chown conveyor:conveyor /artifacts
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CONVEYOR_MODEL_DIR=/artifacts/language \
    CONVEYOR_HOST=0.0.0.0 \
    CONVEYOR_PORT=50051 \
    CONVEYOR_METRICS_PORT=9100
USER conveyor
EXPOSE 50051 9100
# Healthy once the standard grpc.health.v1 service answers SERVING (the model is loaded).
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('CONVEYOR_PORT', '50051')); reply = rpc.HealthStub(channel).Check(pb.HealthCheckRequest(service=''), timeout=2); sys.exit(reply.status != pb.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["conveyor", "serve"]
COPY --from=builder /opt/venv /opt/venv
