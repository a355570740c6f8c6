# tubesum: one image for every role (migrate, fetch worker, GPU worker, Flower, CLI).
# The default torch wheel on PyPI for Linux x86_64 bundles CUDA; GPUs come from the NVIDIA
# container runtime (docker-compose.yml reserves them).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/tubesum/.cache/huggingface

WORKDIR /app

# Dependencies first, so a code change does not reinstall torch.
COPY pyproject.toml README.md ./
COPY tubesum/__init__.py tubesum/__init__.py
RUN mkdir -p producer workers/gpu models migrations/versions \
    && touch producer/__init__.py workers/__init__.py workers/gpu/__init__.py models/__init__.py \
             migrations/__init__.py migrations/versions/__init__.py \
    && pip install ".[gpu]" \
    && pip uninstall -y tubesum

COPY . .
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 tubesum \
    && mkdir -p /home/tubesum/.cache/huggingface \
    && chown -R tubesum /home/tubesum /app

# HF_HOME (above) is this folder, owned by the worker user: compose mounts the hf-cache volume
# there, and a fresh named volume takes the folder's owner, so models are downloaded once.
# Celery refuses nothing as root but warns; workers have no reason to be root.
USER tubesum

CMD ["tubesum", "--help"]
