# syntax=docker/dockerfile:1
#
# One image for the Dask scheduler, the workers, the batch fit Job and (optionally) JupyterLab:
# scheduler, workers and clients must run the same sheap_dask and Dask versions.
#
#   docker build -t REGISTRY/sheap-dask:0.1.0 .                                     # CPU
#   docker build --build-arg VARIANT=gpu -t REGISTRY/sheap-dask:0.1.0-gpu .         # + JAX CUDA 12 wheels
#   docker build --build-arg NOTEBOOK=true -t REGISTRY/sheap-dask:0.1.0-notebook .  # + JupyterLab
#
# Dependencies are pinned by requirements/image.lock (see requirements/README.md to regenerate it).

ARG PYTHON_VERSION=3.11

# ---- builder: compilers available in case a pinned dependency has no wheel ----------------------
FROM python:${PYTHON_VERSION}-slim AS builder
ARG VARIANT=cpu
ARG NOTEBOOK=false

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sheap-dask
ENV PATH=/opt/sheap-dask/bin:$PATH

# Pinned dependencies first: this layer is reused while only the package's code changes.
COPY requirements/ /src/requirements/
RUN pip install -r /src/requirements/image.lock

# The package itself from the project's files (a regular, non-editable install; deps already pinned).
COPY pyproject.toml README.md LICENSE /src/
COPY sheap_dask/ /src/sheap_dask/
RUN pip install --no-deps /src

# GPU variant: JAX's CUDA 12 wheels (the jax/jaxlib versions stay those of the lock).
RUN if [ "$VARIANT" = "gpu" ]; then \
        pip install -c /src/requirements/image.lock "jax[cuda12]==$(pip show jax | sed -n 's/^Version: //p')"; \
    elif [ "$VARIANT" != "cpu" ]; then \
        echo "VARIANT must be cpu or gpu, got '$VARIANT'" >&2; exit 1; \
    fi
RUN if [ "$NOTEBOOK" = "true" ]; then pip install -c /src/requirements/image.lock -r /src/requirements/notebook.in; fi

# Fail the build, not the cluster, when the install is broken.
RUN sheap-dask --help >/dev/null && dask scheduler --version && python -c "import sheap_dask, distributed, jax"

# ---- runtime: slim, no compilers, non-root ---------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
ARG VARIANT=cpu

LABEL org.opencontainers.image.title="sheap-dask" \
      org.opencontainers.image.description="Fit models to very many spectra with JAX on Dask" \
      org.opencontainers.image.licenses="BSD-3-Clause" \
      org.opencontainers.image.source="https://github.com/sheap-dask/sheap-dask"

# tini as PID 1 forwards SIGTERM to dask and reaps the nanny's children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 sheap \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/sheap --shell /usr/sbin/nologin sheap

COPY --from=builder /opt/sheap-dask /opt/sheap-dask
# Nanny settings for JAX workers (malloc thresholds set before each worker process starts).
COPY --from=builder /src/sheap_dask/distributed_nanny.yaml /etc/dask/sheap_dask_nanny.yaml

# Scratch paths live under /tmp so that the root filesystem can be mounted read-only
# (the Helm chart mounts an emptyDir there).
ENV PATH=/opt/sheap-dask/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/sheap \
    DASK_TEMPORARY_DIRECTORY=/tmp/dask \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    SHEAP_DASK_IMAGE_VARIANT=${VARIANT}

USER 1000:1000
WORKDIR /home/sheap
EXPOSE 8786 8787 8788 8888

# Any command: dask scheduler | dask worker tcp://HOST:8786 | sheap-dask fit IN OUT ... | jupyter lab
ENTRYPOINT ["tini", "-g", "--"]
CMD ["sheap-dask", "--help"]
