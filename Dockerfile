# tubesum: one image for every role (migrate, fetch worker, GPU worker, Flower, CLI).
# The default torch wheel on PyPI for Linux x86_64 bundles CUDA; GPUs come from the NVIDIA
# container runtime (docker-compose.yml reserves them).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/tubesum/.cache/huggingface

WORKDIR /app

# Dependencies first, so a code change does not reinstall torch. They are read from pyproject.toml
# (no stub of the package's folders to keep in step with the tree); tests/test_dockerfile.py runs
# these lines in a folder laid out as this stage is.
COPY pyproject.toml scripts/requirements_from_pyproject.py ./
RUN python requirements_from_pyproject.py gpu > requirements.txt \
    && pip install -r requirements.txt \
    && rm requirements.txt requirements_from_pyproject.py

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
