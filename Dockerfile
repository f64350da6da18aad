# qsmprep BIDS App image. One Dockerfile, two targets; no heredocs and no `# syntax=` line, so it builds
# with Docker's classic builder (DOCKER_BUILDKIT=0), BuildKit, podman and buildah alike.
#
#   gpu (default, last stage): CUDA PyTorch base image (torch comes with the base):
#     docker build --target gpu -t qsmprep/qsmprep:<version> --build-arg VERSION=<version> .
#   cpu: any Debian 12 / Python 3.11 base; the CPU build of torch is installed from the PyTorch CPU index:
#     docker build --target cpu -t qsmprep/qsmprep:<version>-cpu --build-arg VERSION=<version> .
#
#   docker run --rm --read-only --tmpfs /tmp -u "$(id -u):$(id -g)" \
#       -v /data:/data:ro -v /out:/out -v /work:/work qsmprep/qsmprep:<version> /data /out participant -w /work
#
# Build arguments:
#   VERSION          the version qsmprep reports (no .git in the build context; CI passes the git tag's)
#   CPU_BASE_IMAGE   base of the cpu target (default debian:bookworm-slim; CI uses a local base made by
#                    debootstrap + docker import, scripts/ci/base-image.sh, since no registry is reachable there)
#   GPU_BASE_IMAGE   base of the gpu target (a pytorch/pytorch CUDA runtime image with TORCH_VERSION)
#   TORCH_VERSION    the torch release the tests and the model cards use (qsmprep/data/models/*.json)
#   TORCH_INDEX_URL  where the cpu target gets torch (default: the PyTorch CPU index)
#
# CI-only build inputs: the cpu target's build stage copies .ci/image/ (empty but for its README in a
# clone). A CI machine behind a TLS-intercepting proxy puts its CA bundle there as ca.crt and, where the
# PyTorch index is unreachable, the CPU torch wheel under wheels/. They are used in the build stage only:
# the published image receives /opt/qsmprep from that stage, never /tmp/ci (see docs/hpc.md).
#
# PyTorch wheels and images ship their own CUDA runtime: the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit (docker --gpus all) or Apptainer's --nv. Without a GPU everything runs on CPU.
ARG CPU_BASE_IMAGE=debian:bookworm-slim
ARG GPU_BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------------------------------
# cpu-build: a virtual environment in /opt/qsmprep with CPU torch, the dependencies and qsmprep
# ---------------------------------------------------------------------------------------------------
FROM ${CPU_BASE_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG VERSION=0.0.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN if ! python3 -c "import venv, ensurepip, ssl" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/qsmprep
COPY .ci/image/ /tmp/ci/
WORKDIR /src/qsmprep
COPY pyproject.toml README.md LICENSE ./
# Dependencies from pyproject.toml (torch first, from the CPU index or a CI wheel; then the rest).
RUN set -e; \
    if [ -s /tmp/ci/ca.crt ]; then export PIP_CERT=/tmp/ci/ca.crt SSL_CERT_FILE=/tmp/ci/ca.crt; fi; \
    if ls /tmp/ci/wheels/torch-${TORCH_VERSION}+cpu-*.whl >/dev/null 2>&1; then \
        /opt/qsmprep/bin/pip install /tmp/ci/wheels/torch-${TORCH_VERSION}+cpu-*.whl; \
    else \
        /opt/qsmprep/bin/pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    fi; \
    /opt/qsmprep/bin/python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(x for x in d if not x.replace(' ', '').startswith('torch')))" > /tmp/requirements.txt; \
    /opt/qsmprep/bin/pip install -r /tmp/requirements.txt; \
    rm -f /tmp/requirements.txt
COPY qsmprep ./qsmprep
# qsmprep itself; `pip check` fails the build when a dependency is missing (no cache can hide that).
RUN set -e; \
    if [ -s /tmp/ci/ca.crt ]; then export PIP_CERT=/tmp/ci/ca.crt SSL_CERT_FILE=/tmp/ci/ca.crt; fi; \
    SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}" /opt/qsmprep/bin/pip install --no-deps . ; \
    /opt/qsmprep/bin/pip check; \
    /opt/qsmprep/bin/python -c "import qsmprep, torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; assert qsmprep.__version__ == '${VERSION}', qsmprep.__version__; print('qsmprep', qsmprep.__version__, 'torch', torch.__version__)"; \
    /opt/qsmprep/bin/bids-validator-deno --version; \
    find /opt/qsmprep -name __pycache__ -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------------
# cpu: the runtime image (base + /opt/qsmprep; nothing from /tmp/ci)
# ---------------------------------------------------------------------------------------------------
FROM ${CPU_BASE_IMAGE} AS cpu
ARG VERSION=0.0.0
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
RUN if ! python3 -c "import ssl" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=cpu-build /opt/qsmprep /opt/qsmprep
# Read-only root filesystem: everything a run writes goes to /out, /work or /tmp (a tmpfs). TemplateFlow's
# home is baked in and read-only: the templates and atlas of qsmprep.anat.templates.PREFETCH are fetched at
# build time where the network allows (a run never downloads; a missing template stops it with the command).
ENV PATH=/opt/qsmprep/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/qsmprep \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba_cache \
    XDG_CACHE_HOME=/tmp/.cache \
    DENO_DIR=/tmp/deno \
    NIPYPE_NO_ET=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    QSMPREP_CONTAINER=docker:qsmprep/qsmprep:${VERSION}-cpu
RUN mkdir -p /opt/templateflow /out /work \
    && (python -m qsmprep.anat.templates || echo "TemplateFlow prefetch incomplete (no network at build time?)") \
    && chmod -R a+rX /opt/templateflow \
    && useradd --create-home --uid 1000 --shell /bin/bash qsmprep \
    && chmod 755 /opt/templateflow /home/qsmprep \
    && chmod 1777 /out /work
USER qsmprep
WORKDIR /tmp
RUN qsmprep --version && bids-validator-deno --version >/dev/null
LABEL org.opencontainers.image.title="qsmprep (CPU)" \
      org.opencontainers.image.description="Quantitative susceptibility mapping from multi-echo GRE MRI, as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/qsmprep/qsmprep" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["qsmprep"]

# ---------------------------------------------------------------------------------------------------
# gpu (default target): CUDA PyTorch base; torch (TORCH_VERSION) comes with the base image, and
# qsmprep is installed into the base's own Python environment (conda in pytorch/pytorch)
# ---------------------------------------------------------------------------------------------------
FROM ${GPU_BASE_IMAGE} AS gpu
ARG TORCH_VERSION
ARG VERSION=0.0.0
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src/qsmprep
COPY pyproject.toml README.md LICENSE ./
RUN set -e; \
    python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"; \
    python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(x for x in d if not x.replace(' ', '').startswith('torch')))" > /tmp/requirements.txt; \
    python -m pip install -r /tmp/requirements.txt; \
    rm -f /tmp/requirements.txt
COPY qsmprep ./qsmprep
RUN set -e; \
    SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}" python -m pip install --no-deps . ; \
    # the base's own packages (conda) may carry pip-check complaints of their own: only qsmprep's count
    python -m pip check > /tmp/pip-check.txt || { cat /tmp/pip-check.txt; ! grep -q '^qsmprep ' /tmp/pip-check.txt; }; \
    rm -f /tmp/pip-check.txt; \
    python -c "import qsmprep, torch; assert qsmprep.__version__ == '${VERSION}', qsmprep.__version__; print('qsmprep', qsmprep.__version__, 'torch', torch.__version__, 'CUDA', torch.version.cuda)"; \
    cd / && rm -rf /src/qsmprep
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/qsmprep \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba_cache \
    XDG_CACHE_HOME=/tmp/.cache \
    DENO_DIR=/tmp/deno \
    NIPYPE_NO_ET=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    QSMPREP_CONTAINER=docker:qsmprep/qsmprep:${VERSION}
RUN mkdir -p /opt/templateflow /out /work \
    && (python -m qsmprep.anat.templates || echo "TemplateFlow prefetch incomplete (no network at build time?)") \
    && chmod -R a+rX /opt/templateflow \
    && useradd --create-home --uid 1000 --shell /bin/bash qsmprep \
    && chmod 755 /opt/templateflow /home/qsmprep \
    && chmod 1777 /out /work
USER qsmprep
WORKDIR /tmp
RUN qsmprep --version && bids-validator-deno --version >/dev/null
LABEL org.opencontainers.image.title="qsmprep" \
      org.opencontainers.image.description="Quantitative susceptibility mapping from multi-echo GRE MRI, as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/qsmprep/qsmprep" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["qsmprep"]
