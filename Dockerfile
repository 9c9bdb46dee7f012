# syntax=docker/dockerfile:1
# Multi-stage: build a virtualenv with the gateway, then copy only it into a
# slim runtime image that runs as a non-root user.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/llm-gateway
ENV PATH=/opt/llm-gateway/bin:$PATH
WORKDIR /src
# The runtime dependencies exactly as locked (`make lock`), each file checked
# against its hash, in a layer of their own that a code change leaves cached;
# then the gateway itself, which may bring in nothing the lock does not list.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY llmgateway ./llmgateway
COPY server ./server
COPY interceptors ./interceptors
COPY clients ./clients
RUN pip install --no-deps . && pip check

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/llm-gateway && chown 10001 /var/lib/llm-gateway
COPY --from=build /opt/llm-gateway /opt/llm-gateway
COPY config.example.yaml /etc/llm-gateway/config.example.yaml
ENV PATH=/opt/llm-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLMGW_SERVER__HOST=0.0.0.0 \
    LLMGW_SERVER__PORT=50051 \
    LLMGW_HTTP__PORT=8080 \
    XDG_STATE_HOME=/var/lib/llm-gateway
# API keys (hashed), their secret and the token signing keys live here.
VOLUME /var/lib/llm-gateway
USER 10001
# gRPC, and the HTTP front door (Anthropic's Messages API; /healthz, /readyz).
EXPOSE 50051 8080
# The gRPC health protocol, not a TCP poke: the check fails while draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-m", "server.healthcheck", "--address", "127.0.0.1:50051", "--timeout", "3"]
# Mount a config file and set LLMGW_CONFIG to use one; SIGTERM drains gracefully.
ENTRYPOINT ["python", "-m", "server"]
