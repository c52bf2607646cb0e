# syntax=docker/dockerfile:1
# The API image: FastAPI, SQL and the CLI. No torch, no transformers: the API never imports
# them, and the image stays small. Jobs run in docker/worker.Dockerfile.
#
#   docker build -f docker/api.Dockerfile -t forgetguard-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FORGETGUARD_MODEL_ROOTS=/models,/artifacts \
    FORGETGUARD_ARTIFACTS_DIR=/artifacts \
    FORGETGUARD_CACHE_DIR=/var/cache/forgetguard

RUN useradd --system --uid 10001 --create-home forgetguard \
    && mkdir -p /var/cache/forgetguard /artifacts \
    && chown forgetguard /var/cache/forgetguard /artifacts

WORKDIR /opt/forgetguard
COPY pyproject.toml README.md ./
COPY app ./app
# The client package: the server imports its job status names and rule book, and its
# `forgetguard` command carries the client's gate, evaluate, compare, finetune and status.
COPY forgetguard ./forgetguard
# Base dependencies + psycopg only: the `worker` extra (torch, transformers, peft) is never
# installed here. The migrations ship inside the package (app/migrations). The check fails
# the build if anything pulled torch in after all.
RUN pip install ".[postgres]" \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

USER forgetguard
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Migrations first (idempotent), then the API alone: workers run in their own containers.
# `serve` refuses a non-loopback bind without FORGETGUARD_API_KEYS.
CMD ["sh", "-c", "forgetguard db upgrade && exec forgetguard serve --workers 0 --host 0.0.0.0 --port 8000"]
