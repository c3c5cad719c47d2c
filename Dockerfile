# esg-memory HTTP service (CPU). Build:  docker build -t esg-memory .
# Run:    docker run -p 8000:8000 -v esg-data:/data \
#           -v "$PWD/token.txt:/run/secrets/esg_memory_token:ro" esg-memory
# Other model/encoder:  docker run ... esg-memory --token-file /run/secrets/esg_memory_token \
#           --model /models/llava --clip ViT-B-32:/models/clip.bin   (mount /models read-only)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app
COPY pyproject.toml README.md ./
COPY esg_memory ./esg_memory
COPY index ./index
# CPU wheels of torch keep the image small; swap the index URL for a CUDA build
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[serve,postgres]"

# never run as root; the memory directory is the only writable state
RUN useradd --create-home --uid 10001 esg && mkdir -p /data && chown esg /data
USER esg
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"

# The token comes from a mounted file (or -e ESG_MEMORY_TOKEN=...); without one the server refuses to start.
# Binding 0.0.0.0 protects reads too (GET /edits, /generate, /route, /metrics, /v1): clients send the token;
# /health (the HEALTHCHECK) stays open. --open-reads serves reads without it.
ENTRYPOINT ["python", "-m", "esg_memory.serve", "--memory", "/data/memory", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--token-file", "/run/secrets/esg_memory_token"]
