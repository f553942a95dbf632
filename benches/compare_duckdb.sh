#!/usr/bin/env bash
# End-to-end comparison with DuckDB on the same work: one NDJSON file of order events → SQL
# filter/projection → Parquet (zstd). Writes benches/results/file-ndjson-to-parquet.md and prints it.
#
#   benches/compare_duckdb.sh                          # 1,000,000 records, 3 runs of each tool
#   BENCH_RECORDS=200000 BENCH_RUNS=5 benches/compare_duckdb.sh
#
# Environment:
#   BENCH_RECORDS   records in the dataset (default 1000000); the dataset is generated once per size
#                   by sluice itself and cached under $SLUICE_CACHE/bench-data
#   BENCH_RUNS      timed runs of each tool, alternating (default 3)
#   BENCH_WARMUP    1 (default): one untimed run of each tool first; 0: none
#   BENCH_QUERY     the SQL (table `orders`), default in benches/harness.py
#   BENCH_RESULTS   where to write the Markdown (default benches/results/file-ndjson-to-parquet.md)
#   BENCH_SKIP_BUILD=1  use the existing release binary
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

records="${BENCH_RECORDS:-1000000}"
runs="${BENCH_RUNS:-3}"
warmup="${BENCH_WARMUP:-1}"

step "toolchain"
ensure_rust
ensure_python_env
py="$SLUICE_VENV/bin/python"

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --release"
  cargo build --release
fi
bin="$CARGO_TARGET_DIR/release/sluice"
[ -x "$bin" ] || { echo "no release binary at $bin" >&2; exit 1; }

step "dataset: $records order events as NDJSON"
data_dir="$SLUICE_CACHE/bench-data"
data="$data_dir/orders-seed42-$records.ndjson"
"$py" benches/harness.py gen-data --sluice "$bin" --records "$records" --out "$data"

step "compare: $runs runs of each tool"
query_args=()
if [ -n "${BENCH_QUERY:-}" ]; then query_args=(--query "$BENCH_QUERY"); fi
"$py" benches/harness.py compare --sluice "$bin" --data "$data" --records "$records" \
  --runs "$runs" --warmup "$warmup" --results "${BENCH_RESULTS:-benches/results/file-ndjson-to-parquet.md}" "${query_args[@]}"
