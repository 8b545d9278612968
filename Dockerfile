# CUDA image of ant_ray for Ray clusters. Build: docker build -t ant_ray .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ant_ray
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first: the x86_64 wheels of this release are CUDA builds. To match another CUDA version, install the
# torch build you need here; pyproject.toml leaves torch unpinned for this reason.
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY ant_ray ./ant_ray
COPY search_spaces ./search_spaces
COPY jobs ./jobs
RUN pip install -c constraints/ci.txt -e .

ENTRYPOINT ["ant-ray"]
CMD ["--help"]
