# syntax=docker/dockerfile:1
# The worker image: one `forgetguard worker` per GPU. CUDA runtime base, the CUDA build of
# torch from PyTorch's index, then the project with its `worker`, `postgres`, `qlora` and
# `deepspeed` extras.
#
#   docker build -f docker/worker.Dockerfile -t forgetguard-worker .
#
# The vLLM variant (`forgetguard worker --backend vllm`) adds the CUDA `vllm` package, with
# the torch it pins, and starts workers on that backend:
#
#   docker build -f docker/worker.Dockerfile --build-arg VLLM_VERSION=0.32.0 \
#       -t forgetguard-worker:vllm .
#
# Ubuntu 24.04 brings Python 3.12 (the project needs >= 3.11; 22.04 ships 3.10). The torch
# wheels carry their own CUDA libraries; the base image provides a matching runtime and the
# driver hooks the NVIDIA container toolkit expects. Override the build args to follow
# another CUDA release.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Empty: the transformers engine only. A version (e.g. 0.32.0): also vLLM, and the default
# backend of the image's workers becomes vllm.
ARG VLLM_VERSION=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FORGETGUARD_MODEL_ROOTS=/models,/artifacts \
    FORGETGUARD_ARTIFACTS_DIR=/artifacts \
    FORGETGUARD_CACHE_DIR=/var/cache/forgetguard

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --create-home forgetguard \
    && mkdir -p /var/cache/forgetguard /artifacts \
    && chown forgetguard /var/cache/forgetguard /artifacts

# The CUDA build first: the project pins torch==2.13.0, which 2.13.0+cu128 already satisfies,
# so the next step keeps it instead of fetching the CPU build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -c "import torch; assert torch.version.cuda, 'a CPU-only torch was installed'"

# vLLM next, when asked for: it pins transformers and fastapi below what forgetguard would
# otherwise take, so the project is then installed held to vLLM's versions.
RUN if [ -n "${VLLM_VERSION}" ]; then \
        pip install "vllm==${VLLM_VERSION}" \
        && pip freeze | grep -iE '^(torch|transformers|tokenizers|fastapi|starlette|pydantic)==' \
            > /opt/vllm-pins.txt \
        && python -c "import vllm, torch; assert torch.version.cuda"; \
    else : > /opt/vllm-pins.txt; fi

WORKDIR /opt/forgetguard
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY forgetguard ./forgetguard
# With QLoRA's bitsandbytes and DeepSpeed (strategy "deepspeed"), which GPUs are for; DeepSpeed
# installs as pure Python and compiles nothing for ZeRO-2 with the trainer's own AdamW.
RUN pip install -c /opt/vllm-pins.txt -e ".[worker,postgres,qlora,deepspeed]" \
    && python -c "import torch; assert torch.version.cuda and torch.__version__.startswith('${TORCH_VERSION}')"
ENV FORGETGUARD_WORKER_BACKEND=${VLLM_VERSION:+vllm}

USER forgetguard
# Exec form: the worker is the process that gets SIGTERM (finish the batch, release, exit 0).
ENTRYPOINT ["forgetguard", "worker"]
CMD ["--device", "cuda", "--kinds", "evaluation,finetune"]
