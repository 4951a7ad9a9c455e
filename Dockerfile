# shardlab with the pinned torch on a Python base:
#   docker build -t shardlab . && docker run --gpus all --ipc=host shardlab model=llama_160m strategy=fsdp launcher.nproc_per_node=auto
# --ipc=host (or a large --shm-size, e.g. 16g): several processes on one machine share tensors and nccl's
# shared-memory transport through /dev/shm, which Docker caps at 64 MB by default.
# PyPI's Linux torch wheel is the CUDA build and brings its CUDA libraries (nvidia-* wheels), so the image
# needs only the host's driver (the NVIDIA container toolkit) and exactly one torch: the pinned one. No
# CUDA base image, whose own torch would be a second copy of several GB with extensions built for it.
FROM python:3.11-slim-bookworm

# A C compiler: Triton builds a small launcher for every kernel it compiles (strategy.compile, optim=adamw8bit,
# precision=int8 and fp8's compiled paths).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/shardlab
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WANDB_MODE=offline

# The dependencies pinned in pyproject.toml, torch included, so the image runs the versions the tests ran.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

COPY . .
RUN useradd --create-home --uid 1000 shardlab && chown -R 1000 /workspace/shardlab
USER 1000

ENTRYPOINT ["python", "train.py"]
