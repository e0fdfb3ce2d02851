# The trainer image: `conveyor train` + `conveyor export` into /artifacts/<name> (a volume), once: the entrypoint
# skips when /artifacts/<name>/model.onnx exists. CPU-only torch (torch==X+cpu, the version pyproject.toml pins).
#
#   docker build -f docker/trainer.Dockerfile -t conveyor-trainer:0.1.0 .
#   docker run -v artifacts:/artifacts -e CONVEYOR_TRAIN_TASK=language conveyor-trainer:0.1.0
#
# Offline builds, builders and step order: see docker/server.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim-bookworm

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
RUN python3 /deps/pyproject_requirements.py /deps/pyproject.toml --extra train --torch-local-version cpu \
    >/deps/requirements.txt

FROM ${BASE_IMAGE} AS builder
ARG PIP_OFFLINE=0
# Online, torch comes from PyTorch's CPU index: PyPI's Linux torch wheel is the CUDA build (GBs of nvidia-*).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
COPY docker/wheelhouse/ /wheels/
COPY --from=requirements /deps/requirements.txt /deps/
RUN set -eu; \
    if [ "$PIP_OFFLINE" = 1 ]; then index="--no-index"; else index="--extra-index-url $TORCH_INDEX_URL"; fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install --quiet $index --find-links /wheels -r /deps/requirements.txt; \
    /opt/venv/bin/python -c "import sys, torch; sys.exit('torch is a CUDA build' if torch.version.cuda else 0)"; \
    if /opt/venv/bin/pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA wheels were installed" >&2; exit 1; fi
COPY --from=source /src/ /src/
RUN set -eu; \
    if [ "$PIP_OFFLINE" = 1 ]; then index="--no-index"; else index=""; fi; \
    /opt/venv/bin/pip install --quiet --no-deps $index --find-links /wheels /src; \
    /opt/venv/bin/python -c "import training.train, export"; \
    /opt/venv/bin/conveyor train --help >/dev/null; \
    find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
# A home of its own: ONNX Runtime (and matplotlib) keep small state files there, and warn without one.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/conveyor --shell /usr/sbin/nologin \
        conveyor \
    && mkdir -p /artifacts && chown conveyor:conveyor /artifacts
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLBACKEND=Agg \
    CONVEYOR_ARTIFACTS=/artifacts \
    CONVEYOR_TRAIN_TASK=language
USER conveyor
ENTRYPOINT ["conveyor-trainer"]
COPY docker/trainer-entrypoint.sh /usr/local/bin/conveyor-trainer
COPY --from=builder /opt/venv /opt/venv
