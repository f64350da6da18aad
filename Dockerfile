# syntax=docker/dockerfile:1
# qsmprep BIDS App image: CUDA-enabled PyTorch base, qsmprep installed as a non-root user.
#
#   docker build -t qsmprep/qsmprep:<version> --build-arg VERSION=<version> .
#   docker run --rm --gpus all -v /data:/data:ro -v /out:/out qsmprep/qsmprep:<version> /data /out participant
#
# PyTorch wheels and images ship their own CUDA runtime: the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit (docker --gpus all) or Apptainer's --nv. Without a GPU everything runs on CPU.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0.dev0
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba_cache \
    NIPYPE_NO_ET=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    QSMPREP_CONTAINER=docker:qsmprep/qsmprep:${VERSION}

# Dependencies first (this layer is reused while only the source changes). torch comes from the
# base image; the other requirements are read from pyproject.toml.
WORKDIR /src/qsmprep
COPY pyproject.toml README.md ./
RUN python - <<'PY' > /tmp/requirements.txt && python -m pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.replace(" ", "").startswith("torch")))
PY

COPY qsmprep ./qsmprep
RUN python -m pip install --no-deps . \
    && python -c "import qsmprep, torch; print('qsmprep', qsmprep.__version__, 'torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && rm -rf /src/qsmprep

# TemplateFlow cache location baked in (read-only at run time; qsmprep itself needs no download)
RUN mkdir -p /opt/templateflow && chmod 755 /opt/templateflow

RUN useradd --create-home --uid 1000 --shell /bin/bash qsmprep
USER qsmprep
ENV HOME=/home/qsmprep
WORKDIR /tmp
RUN qsmprep --version

LABEL org.opencontainers.image.title="qsmprep" \
      org.opencontainers.image.description="Quantitative susceptibility mapping from multi-echo GRE MRI, as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/qsmprep/qsmprep" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["qsmprep"]
