#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing (idempotently), then runs
# fmt, clippy, every test, and the README's quickstart check. Starts the services the tests talk to
# (a Kafka-protocol broker, tansu, on 127.0.0.1:$SLUICE_KAFKA_PORT, default 19092, and an
# S3-compatible server, Garage, on 127.0.0.1:$SLUICE_S3_PORT, default 13900; PostgreSQL on
# 127.0.0.1:5432) and leaves them running for the next run.
#
#   scripts/test.sh              # everything
#   SLUICE_SKIP_LINT=1 scripts/test.sh   # tests only
#
# Caches live outside the clone: $SLUICE_CACHE (default ~/.cache/sluice) holds the cargo target
# directory, the Python virtualenv (pyarrow, duckdb, helm-python-sdk, kubernetes-validate,
# hadolint) built from scripts/requirements.txt and docker-compose's own virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

step "toolchain"
ensure_debian_packages libssl-dev pkg-config openssl libjemalloc2
ensure_rust
ensure_python_env
export PATH="$SLUICE_VENV/bin:$PATH"

if [ "${SLUICE_SKIP_LINT:-0}" != 1 ]; then
  step "cargo fmt --check"
  cargo fmt --all --check
  step "cargo clippy --all-targets -- -D warnings"
  cargo clippy --all-targets --locked -- -D warnings
fi

step "services"
export SLUICE_KAFKA_PORT="${SLUICE_KAFKA_PORT:-19092}"
# The memory engine: the sqlite one stops answering once a fetch covers ~30k records per
# partition (seen with sluice and with confluent-kafka alike). Its end-offset quirk is handled by
# tests/kafka_tool.py, which sends the last record of each partition in a batch of its own.
start_tansu "$SLUICE_KAFKA_PORT" memory
export SLUICE_TEST_KAFKA="127.0.0.1:$SLUICE_KAFKA_PORT"
# tests/it/security.rs starts brokers of its own (SASL users, behind a TLS proxy).
export SLUICE_TEST_TANSU="$SLUICE_BIN/tansu"
# tests/it/faults.rs starts (and kills, and restarts) an S3 server of its own.
export SLUICE_TEST_GARAGE="$SLUICE_BIN/garage"
# An S3-compatible server (Garage) with a test key; its id and secret go to the tests through the
# environment only.
export SLUICE_S3_PORT="${SLUICE_S3_PORT:-13900}"
start_garage "$SLUICE_S3_PORT"
# shellcheck disable=SC1090
source "$SLUICE_CACHE/run/garage-$SLUICE_S3_PORT/env"
export SLUICE_TEST_PYTHON="$SLUICE_VENV/bin/python"
# The allocator of README's flat-memory recipe (tests/it/memory.rs runs sluice under it).
SLUICE_TEST_JEMALLOC="$(dpkg -L libjemalloc2 | grep '/libjemalloc\.so\.2$' | head -n 1)"
export SLUICE_TEST_JEMALLOC
# PostgreSQL: the machine's server on 127.0.0.1:5432 (started or installed when missing).
start_postgres
export SLUICE_TEST_PG_URL="${SLUICE_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/sluice_test}"

step "cargo test"
# Every sluice process the tests run keeps a copy of its output here (tests/tee_output.sh).
SLUICE_TEST_LOG_DIR="$(mktemp -d)"
export SLUICE_TEST_LOG_DIR
trap 'rm -rf "$SLUICE_TEST_LOG_DIR"' EXIT
cargo test --locked --all-targets 2>&1 | tee "$SLUICE_CACHE/last-test.log"

step "no test secret in any output: every sluice log line and error of the suite, and cargo test's output"
python scripts/check_secrets.py --self-test
python scripts/check_secrets.py --logs "$SLUICE_TEST_LOG_DIR" --file "$SLUICE_CACHE/last-test.log"

step "deploy: Helm chart (rendered, linted, validated), Dockerfile (hadolint), docker-compose config"
ensure_compose_env
SLUICE_DOCKER_COMPOSE="$SLUICE_COMPOSE_VENV/bin/docker-compose" SLUICE_BIN_PATH="$CARGO_TARGET_DIR/debug/sluice" \
  python tests/deploy/test_deploy.py

step "benchmark suite, smoke run: every scenario and baseline on a tiny dataset (debug build), outputs checked"
out="$(mktemp -d)"
trap 'rm -rf "$out" "$SLUICE_TEST_LOG_DIR"' EXIT
BENCH_PROFILE=debug BENCH_SKIP_BUILD=1 BENCH_RECORDS=3000 BENCH_RUNS=1 BENCH_LATENCY_RATE=200 \
  BENCH_LATENCY_SECONDS=8 BENCH_MEMORY_COUNTS=2000,20000 BENCH_MEMORY_RUNS=1 BENCH_RESULTS_DIR="$out/suite" \
  benches/suite.sh
test -s "$out/suite/suite.md" && test -s "$out/suite/suite.png"

step "README quickstart: run it and read the Parquet back with pyarrow"
SLUICE_OUT="$out" "$CARGO_TARGET_DIR/debug/sluice" run --no-progress pipelines/quickstart.toml
python scripts/check_quickstart.py "$out/quickstart"

step "all passed"
