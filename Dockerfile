# shardlab on a CUDA PyTorch base: docker build -t shardlab . && docker run --gpus all shardlab model=llama_160m
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /workspace/shardlab
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WANDB_MODE=offline

# The dependencies pinned in pyproject.toml, torch included (PyPI's Linux torch wheel is the CUDA build),
# so the image runs the versions the tests ran.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

COPY . .
RUN useradd --create-home --uid 1000 shardlab && chown -R 1000 /workspace/shardlab
USER 1000

ENTRYPOINT ["python", "train.py"]
