# The image one training stage runs in on Kubernetes (compute.launcher: k8s; orchestration/launchers.py).
#   docker build -t sftkey:0.1.0 .                                                    # CPU torch
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t sftkey:0.1.0-cuda .
# Build it from the checkout the pipeline runs from: the repo's .git comes along, so the stage keys the pod
# computes (they hold the code version: sftkey/version.py) are the ones the pipeline looks its stages up by.
FROM python:3.11-slim

# Where torch comes from: the CPU wheels by default, a CUDA wheel index for GPU pods
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# git: sftkey/version.py describes the code by its commit
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /app

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0
COPY . /app
RUN pip install -e . && pip check

# One stage: the pod's command is this plus the stage's arguments, or `accelerate launch ... -m
# orchestration.launch_stage ...` for several processes in the pod.
ENTRYPOINT ["python", "-m", "orchestration.launch_stage"]
