# The services' image: one image, four commands (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY stratorch ./stratorch
RUN pip install . && useradd --uid 10000 --no-create-home stratorch
# The scheduler and symbol_worker talk to the host's dockerd through its socket, which is
# root-owned; the other services drop to the unprivileged user (compose sets `user`).
CMD ["python", "-m", "services.scheduler"]
