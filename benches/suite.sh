#!/usr/bin/env bash
# The benchmark suite, one command: starts the services it needs (tansu on 127.0.0.1:19093, Garage
# on 13920, the local PostgreSQL), generates the dataset, loads it into the topic and a table, runs
# every scenario of benches/suite.py against its baselines, and writes benches/results/suite.md and
# benches/results/suite.png. It stops the broker and Garage it started at the end.
#
#   BENCH_RECORDS        records in the dataset (default 1000000)
#   BENCH_PARTITIONS     Kafka partitions (default 12)
#   BENCH_RUNS           timed runs per contender, alternating (default 3)
#   BENCH_ONLY           comma-separated scenarios (default: all; see benches/suite.py --help)
#   BENCH_LATENCY_RATE, BENCH_LATENCY_SECONDS   the steady-rate run (default 1000 records/s, 30 s)
#   BENCH_MEMORY_COUNTS  generator record counts for the memory table (default 1000000,10000000)
#   BENCH_MEMORY_RUNS    runs per count (default 2)
#   BENCH_RESULTS_DIR    where the report goes (default benches/results)
#   BENCH_EXTERNAL=1     use running services instead (BENCH_BROKERS, BENCH_PG_URL, SLUICE_TEST_S3_*)
#   BENCH_SKIP_BUILD=1   use the existing binaries
#   BENCH_PROFILE        the cargo profile whose binaries are measured (default release; scripts/test.sh
#                        runs a smoke run of the suite on the debug build it already has)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

records="${BENCH_RECORDS:-1000000}"
partitions="${BENCH_PARTITIONS:-12}"
kafka_port="${BENCH_KAFKA_PORT:-19093}"
s3_port="${BENCH_S3_PORT:-13920}"
pg_url="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/sluice_test}"

step "toolchain and the benchmark virtualenv ($SLUICE_BENCH_VENV)"
ensure_rust
ensure_bench_env
py="$SLUICE_BENCH_VENV/bin/python"
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --release (sluice and the bare consume loop)"
  cargo build --release --bin sluice --bin kafka-bare
fi
profile="${BENCH_PROFILE:-release}"
bin="$CARGO_TARGET_DIR/$profile/sluice"
bare="$CARGO_TARGET_DIR/$profile/kafka-bare"
[ -x "$bin" ] && [ -x "$bare" ] || { echo "missing release binaries (run without BENCH_SKIP_BUILD)" >&2; exit 1; }

if [ "${BENCH_EXTERNAL:-0}" = 1 ]; then
  # Services that already run, e.g. the docker-compose stack with deploy/docker-compose.bench.yml
  # (README, Benchmarks): BENCH_BROKERS, BENCH_PG_URL and SLUICE_TEST_S3_ENDPOINT, _KEY_ID, _SECRET
  # (and _REGION) name them.
  : "${BENCH_BROKERS:?BENCH_EXTERNAL=1 needs BENCH_BROKERS}"
  : "${SLUICE_TEST_S3_ENDPOINT:?BENCH_EXTERNAL=1 needs SLUICE_TEST_S3_ENDPOINT, _KEY_ID and _SECRET}"
  brokers="$BENCH_BROKERS"
  services="external: Kafka at $brokers, S3 at $SLUICE_TEST_S3_ENDPOINT, PostgreSQL at the URL given"
  step "services: external (Kafka $brokers, S3 $SLUICE_TEST_S3_ENDPOINT)"
else
  step "services: PostgreSQL, Garage on 127.0.0.1:$s3_port, tansu (memory engine) on 127.0.0.1:$kafka_port"
  start_postgres
  stop_garage "$s3_port"
  rm -rf "$SLUICE_CACHE/run/garage-$s3_port"
  start_garage "$s3_port"
  stop_tansu "$kafka_port"
  start_tansu "$kafka_port" memory
  cleanup() { stop_garage "$s3_port"; stop_tansu "$kafka_port"; }
  trap cleanup EXIT
  # shellcheck disable=SC1090
  source "$SLUICE_CACHE/run/garage-$s3_port/env"
  brokers="127.0.0.1:$kafka_port"
  services="tansu 0.6.0 (memory engine), Garage 2.5.0 and PostgreSQL, all on this machine"
fi
bucket="suite-$(date +%s)"
"$py" tests/s3_tool.py mkbucket "$bucket" >/dev/null

data="$SLUICE_CACHE/bench-data/orders250-$records.ndjson"
step "dataset: $records ~250-byte JSON order events ($data)"
"$py" benches/kafka_bench.py gen --count "$records" --out "$data"
topic="suite-orders-$(date +%s)"
step "load: the dataset into $topic ($partitions partitions)"
"$py" benches/kafka_bench.py load --brokers "$brokers" --topic "$topic" --count "$records" \
  --partitions "$partitions" --data "$data"

step "scenarios"
args=(--sluice "$bin" --bare "$bare" --brokers "$brokers" --topic "$topic" --records "$records"
  --partitions "$partitions" --data "$data" --pg-url "$pg_url" --source-table "bench.suite_src"
  --bucket "$bucket" --services "$services" --runs "${BENCH_RUNS:-3}" --results-dir "${BENCH_RESULTS_DIR:-benches/results}")
[ -n "${BENCH_ONLY:-}" ] && args+=(--only "$BENCH_ONLY")
[ -n "${BENCH_LATENCY_RATE:-}" ] && args+=(--latency-rate "$BENCH_LATENCY_RATE")
[ -n "${BENCH_LATENCY_SECONDS:-}" ] && args+=(--latency-seconds "$BENCH_LATENCY_SECONDS")
[ -n "${BENCH_MEMORY_COUNTS:-}" ] && args+=(--memory-counts "$BENCH_MEMORY_COUNTS")
[ -n "${BENCH_MEMORY_RUNS:-}" ] && args+=(--memory-runs "$BENCH_MEMORY_RUNS")
"$py" benches/suite.py "${args[@]}"
