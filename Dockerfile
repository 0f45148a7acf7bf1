# GPT4People image: one image for workers, helpers, the web app and Flower.
#   CPU:  docker build -t gpt4people .
#   CUDA: docker build -t gpt4people:cuda --build-arg BASE=nvidia/cuda:12.4.1-devel-ubuntu22.04 \
#             --build-arg LLAMA_CUDA=1 .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG LLAMA_CUDA=0
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY scripts/ scripts/
# CPU builds get portable flags chosen from the build host's CPU (see scripts/llama-cmake-args);
# pass CMAKE_ARGS to build for another CPU. LLAMA_CUDA=1 adds -DGGML_CUDA=on.
RUN GPT4P_LLAMA_CUDA=${LLAMA_CUDA} scripts/install-llama /opt/venv
COPY pyproject.toml README.md celeryconfig.py ./
COPY kernel/ kernel/
COPY answer/ answer/
COPY workers/ workers/
COPY channels/ channels/
COPY helpers/ helpers/
COPY gpt4people/ gpt4people/
# Every bundled model (GPT4P_MODEL picks one), installed and verified at build time.
RUN pip install --no-cache-dir . \
 && GPT4P_CACHE_DIR=/opt/gpt4people gpt4people models --install

RUN useradd --create-home --uid 10001 gpt4people
USER gpt4people
ENV GPT4P_CACHE_DIR=/opt/gpt4people GPT4P_HTTP_HOST=0.0.0.0
EXPOSE 8000 5555
CMD ["gpt4people", "worker"]
