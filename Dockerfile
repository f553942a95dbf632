# syntax=docker/dockerfile:1
# The sluice image: a release build of the `sluice` binary on Debian slim, run as uid 10001.
#
#   docker build -t sluice:0.1.0 .
#   docker build --build-arg SLUICE_FEATURES="..." -t sluice:0.1.0 .
#
# Stages: chef (toolchain + cargo-chef) → planner (recipe of the dependencies) → builder
# (dependencies cooked in their own layer, then sluice) → runtime (the binary, no compilers).
# Base images are pinned by tag; pin them by digest (FROM image:tag@sha256:…) for reproducible
# release builds.

FROM rust:1.95-bookworm AS chef
# librdkafka is built from source with TLS and zstd: a C toolchain, make, perl, pkg-config and
# the OpenSSL and zlib headers. Package versions are not pinned: the base image is, and Debian
# replaces old package versions with security updates, so pins would break later builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential \
        cmake \
        libssl-dev \
        make \
        perl \
        pkg-config \
        zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --version 0.1.77 --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ARG SLUICE_FEATURES=""
COPY --from=planner /src/recipe.json recipe.json
# Only the dependencies: this layer is rebuilt when Cargo.toml or Cargo.lock change, not the code.
RUN cargo chef cook --release --locked --bin sluice --features "$SLUICE_FEATURES" --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin sluice --features "$SLUICE_FEATURES" \
    && install -m 0755 target/release/sluice /usr/local/bin/sluice

FROM debian:bookworm-slim AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Streaming ETL runtime: Kafka, PostgreSQL and S3 as Arrow record batches, transformed with DataFusion SQL" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# libssl3 for librdkafka's TLS, CA certificates for every TLS client, libjemalloc2 for README's
# flat-memory setting (unused unless LD_PRELOAD names it). Not pinned, as above.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 libjemalloc2 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sluice
COPY --from=builder /usr/local/bin/sluice /usr/local/bin/sluice
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["--help"]
