# The services' image: one image, four commands and the Docker API proxy (see compose.yaml).
# PYTHON_IMAGE: the base; compose.test.yaml swaps in a stand-in built without a registry.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# The dependencies first, exactly the pinned ones: this layer is rebuilt only when a pin moves.
COPY constraints.txt ./
RUN pip install --only-binary=:all: -r constraints.txt
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY stratorch ./stratorch
# --no-deps: everything is pinned above; `pip check` fails the build if a pin is missing.
# Compiled now: the services run with a read-only root file system.
RUN pip install --no-deps . && pip check && python -m compileall -q /app \
    && useradd --uid 10000 --no-create-home --shell /usr/sbin/nologin stratorch
# Every service runs as this unprivileged user; none holds dockerd's socket (compose.yaml's
# docker-proxy does, and lets the scheduler and workers do only what a sandbox needs).
USER 10000:10000
CMD ["python", "-m", "services.scheduler"]
