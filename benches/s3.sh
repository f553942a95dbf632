#!/usr/bin/env bash
# Object-storage benchmarks: JSON order events -> Parquet on S3 (Garage) with sluice and with a
# hand-written Python pipeline (pyarrow + boto3 multipart), from a file and from Kafka, in one run.
# Writes benches/results/s3.md.
#
# Starts its own Garage on 127.0.0.1:$BENCH_S3_PORT (default 13920) and tansu (memory engine) on
# 127.0.0.1:$BENCH_KAFKA_PORT (default 19093), and stops both at the end.
#
#   BENCH_RECORDS        records from the file and the generator (default 2000000)
#   BENCH_KAFKA_RECORDS  records through Kafka (default 1000000; 0 skips the Kafka scenario)
#   BENCH_PARTITIONS     Kafka partitions (default 12)
#   BENCH_KAFKA_BATCH    records per producer batch in the loaded topic (default 200: full batches,
#                        as a producer working through a backlog writes them; 1 is the worst case
#                        for the per-record overhead both pipelines pay).
#                        tansu's memory engine skips the rest of a batch when a fetch starts inside
#                        it, as after a paused partition resumes: the row check then fails the run
#   BENCH_RUNS           timed runs of each, alternating (default 3)
#   BENCH_SKIP_BUILD=1   use the existing release binary
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

records="${BENCH_RECORDS:-2000000}"
krecords="${BENCH_KAFKA_RECORDS:-1000000}"
partitions="${BENCH_PARTITIONS:-12}"
kbatch="${BENCH_KAFKA_BATCH:-200}"
s3_port="${BENCH_S3_PORT:-13920}"
kafka_port="${BENCH_KAFKA_PORT:-19093}"

step "toolchain"
ensure_rust
ensure_python_env
py="$SLUICE_VENV/bin/python"
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --release"
  cargo build --release --bin sluice --bin kafka-bare
fi
bin="$CARGO_TARGET_DIR/release/sluice"

data="$SLUICE_CACHE/bench-data/orders-$records.ndjson"
step "dataset: $records order events as NDJSON"
"$py" benches/harness.py gen-data --sluice "$bin" --records "$records" --out "$data"

step "S3: Garage on 127.0.0.1:$s3_port"
stop_garage "$s3_port"
rm -rf "$SLUICE_CACHE/run/garage-$s3_port"
start_garage "$s3_port"
cleanup() { stop_garage "$s3_port"; stop_tansu "$kafka_port"; }
trap cleanup EXIT
# shellcheck disable=SC1090
source "$SLUICE_CACHE/run/garage-$s3_port/env"
bucket="bench-$(date +%s)"
"$py" tests/s3_tool.py mkbucket "$bucket" >/dev/null

kafka_args=()
if [ "$krecords" != 0 ]; then
  step "Kafka: tansu (memory engine) on 127.0.0.1:$kafka_port, $krecords records"
  stop_tansu "$kafka_port"
  start_tansu "$kafka_port" memory
  topic="bench-s3-$(date +%s)"
  "$py" benches/kafka_bench.py load --brokers "127.0.0.1:$kafka_port" --topic "$topic" --count "$krecords" \
    --partitions "$partitions" --batch-records "$kbatch"
  kafka_args=(--brokers "127.0.0.1:$kafka_port" --topic "$topic" --kafka-records "$((krecords + partitions))"
    --kafka-batch "$kbatch")
fi

step "compare"
"$py" benches/s3_bench.py compare --sluice "$bin" --bucket "$bucket" --data "$data" --records "$records" \
  "${kafka_args[@]}" --runs "${BENCH_RUNS:-3}" --results benches/results/s3.md
