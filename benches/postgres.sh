#!/usr/bin/env bash
# PostgreSQL benchmarks: JSON order events into a table with sluice's postgres sink (insert and
# upsert) against psql \copy of the same records as CSV, and a table out to Parquet with sluice's
# postgres source against a hand-written Python pipeline (psycopg 3 COPY + pyarrow), in one run.
# Writes benches/results/postgres.md.
#
# Uses the machine's PostgreSQL on 127.0.0.1:5432 (started, and installed if missing, by
# start_postgres in scripts/lib.sh), database sluice_test, schema `bench` (dropped and made anew).
#
#   BENCH_RECORDS        records (default 1000000)
#   BENCH_RUNS           timed runs of each, alternating (default 3)
#   BENCH_PG_URL         another server (default postgres://postgres@127.0.0.1:5432/sluice_test)
#   BENCH_ONLY           comma-separated scenarios (default all; see benches/postgres_bench.py)
#   BENCH_SKIP_BUILD=1   use the existing release binary
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

records="${BENCH_RECORDS:-1000000}"
url="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/sluice_test}"

step "toolchain"
ensure_rust
ensure_python_env
py="$SLUICE_VENV/bin/python"
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --release"
  cargo build --release --bin sluice
fi
bin="$CARGO_TARGET_DIR/release/sluice"

data="$SLUICE_CACHE/bench-data/orders-$records.ndjson"
step "dataset: $records order events as NDJSON"
"$py" benches/harness.py gen-data --sluice "$bin" --records "$records" --out "$data"

if [ -z "${BENCH_PG_URL:-}" ]; then
  step "PostgreSQL on 127.0.0.1:5432"
  start_postgres
else
  command -v psql >/dev/null 2>&1 || ensure_debian_packages postgresql-client
fi

step "compare"
"$py" benches/postgres_bench.py compare --sluice "$bin" --url "$url" --data "$data" --records "$records" \
  --runs "${BENCH_RUNS:-3}" --only "${BENCH_ONLY:-}" --results benches/results/postgres.md
