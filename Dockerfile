# rerank-server for CPUs (the CUDA image is Dockerfile.cuda).
#   docker build -t rerank-server:cpu .
#   docker run -p 50051:50051 -v rerank-cache:/var/cache/huggingface rerank-server:cpu \
#     --model-id cross-encoder/ms-marco-MiniLM-L6-v2
# One port serves gRPC and HTTP/JSON. CPU features (AVX-512, AVX2, AMX) are detected at run time, so the image
# runs on any x86-64 machine. It runs as the unprivileged user 10001:10001 (deploy/ sets runAsUser to match).
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin rerank-server

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rerank \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin rerank \
 && mkdir -p /var/cache/huggingface \
 && chown 10001:10001 /var/cache/huggingface
COPY --from=build /src/target/release/rerank-server /usr/local/bin/rerank-server
COPY config/default.toml /etc/rerank-server/config.toml
ENV RERANK_HOST=0.0.0.0 RERANK_PORT=50051 RERANK_DEVICE=cpu HF_HOME=/var/cache/huggingface
USER 10001:10001
EXPOSE 50051
# SERVING only once the model is loaded and warmed up; the first start may download the model.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["rerank-server", "--health-check", "http://127.0.0.1:50051"]
ENTRYPOINT ["rerank-server", "--config", "/etc/rerank-server/config.toml"]
