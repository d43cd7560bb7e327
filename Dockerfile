# syntax=docker/dockerfile:1
#
# catena-ingest: one image, one binary, many roles (relay, worker, migrate, topology, ...):
#   docker build -t catena-ingest .
#   docker run --rm catena-ingest relay
# Needs BuildKit (the default builder of current Docker) for the cache mounts.

############################ builder ############################
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cargo registry, git checkouts and target/ live in BuildKit cache mounts: they survive
# between builds but are not part of any layer, so the binary is copied out of target/
# inside the same RUN.
RUN --mount=type=cache,id=catena-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=catena-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=catena-target,target=/src/target \
    cargo build --release --locked --bin catena-ingest \
    && install -D -m 0755 target/release/catena-ingest /out/catena-ingest

############################ runtime ############################
FROM debian:bookworm-slim AS runtime
# libssl3 + ca-certificates: TLS to RabbitMQ/PostgreSQL (native-tls links the system OpenSSL).
# curl: container healthchecks (GET /readyz) in docker-compose.yml.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 catena \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin catena
COPY --from=builder /out/catena-ingest /usr/local/bin/catena-ingest
USER 10001:10001
ENV LOG_FORMAT=json \
    RUST_LOG=info
# 8080: relay (webhooks, /healthz, /readyz, /metrics); 9090: worker (/healthz, /readyz, /metrics)
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/catena-ingest"]
CMD ["--help"]
