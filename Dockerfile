# syntax=docker/dockerfile:1
# Pathway-explanation server: TorchServe 0.12 + this project's handler and model archive.
#
#   GPU (default):  docker build -t pathway-serve .
#                   docker run --gpus all -p 8080:8080 -p 127.0.0.1:8081:8081 -p 8082:8082 pathway-serve
#   CPU:            docker build --build-arg VARIANT=cpu -t pathway-serve:cpu .
#
# Ports: 8080 inference (+ KServe v1/v2 routes), 8081 management, 8082 Prometheus metrics.
# Token authorisation stays ON: the keys are in /home/model-server/var/key_file.json
#   docker exec <container> cat /home/model-server/var/key_file.json
# Configuration: any TorchServe property as TS_<PROPERTY> (enable_envvars_config=true), e.g.
#   -e TS_TOKEN_EXPIRATION_MIN=720 -e TS_DEFAULT_RESPONSE_TIMEOUT=60
# See docs/production.md.

# VARIANT=gpu: the CUDA runtime base (the host needs the NVIDIA driver and container toolkit: --gpus all).
# VARIANT=cpu: plain Ubuntu and PyTorch's CPU wheels (no CUDA libraries, a much smaller image).
ARG VARIANT=gpu
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
ARG CPU_BASE=ubuntu:22.04

FROM ${CUDA_BASE} AS base-gpu
ENV TORCH_INDEX_URL=""

FROM ${CPU_BASE} AS base-cpu
ENV TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"

FROM base-${VARIANT} AS runtime
ARG VARIANT

# Python 3.11 (the version the project is tested with) and Java 17 for TorchServe's frontend.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv openjdk-17-jre-headless ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A non-root user owns only its home (run directory: key file, logs, TorchServe's scratch space).
RUN groupadd --gid 10001 model-server \
    && useradd --uid 10001 --gid model-server --create-home --home-dir /home/model-server \
        --shell /usr/sbin/nologin model-server

# The project and its dependencies, pinned by constraints.txt (the exact versions the tests ran with).
WORKDIR /opt/pathway
COPY pyproject.toml constraints.txt README.md ./
COPY handler/ handler/
RUN python3.11 -m venv /opt/venv \
    && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL" \
        PIP_EXTRA_INDEX_URL="https://pypi.org/simple"; fi \
    && PIP_CONSTRAINT=/opt/pathway/constraints.txt /opt/venv/bin/pip install --no-cache-dir ".[serve]" \
    && /opt/venv/bin/python -c "import torch, torchvision, timm, ts, yaml; print('torch', torch.__version__)"
ENV PATH=/opt/venv/bin:$PATH

# Server configuration (loopback addresses in the file; the image binds all interfaces through TS_*_ADDRESS
# below so that published ports work) and the model store, built into the image. To serve other archives,
# mount a store over it: -v $PWD/model_store:/opt/pathway/model_store:ro
COPY config.properties /opt/pathway/config.properties
RUN pathway-archive --out /opt/pathway/model_store

ENV PATHWAY_CONFIG=/opt/pathway/config.properties \
    PATHWAY_MODEL_STORE=/opt/pathway/model_store \
    PATHWAY_RUN_DIR=/home/model-server/var \
    TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_MANAGEMENT_ADDRESS=http://0.0.0.0:8081 \
    TS_METRICS_ADDRESS=http://0.0.0.0:8082 \
    PYTHONUNBUFFERED=1

USER model-server
WORKDIR /home/model-server
EXPOSE 8080 8081 8082

# TorchServe 0.12 wants the inference token even on /ping: the check reads it from the run directory's key file.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["pathway-serve", "--healthcheck"]

# The same entry point as `make run` and the tests; SIGTERM stops TorchServe and its workers cleanly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pathway-serve", "--no-build"]
