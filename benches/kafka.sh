#!/usr/bin/env bash
# Kafka benchmarks: Kafka -> blackhole and Kafka -> SQL -> Parquet with sluice, against a bare
# rdkafka consume loop and a hand-written Python pipeline (confluent-kafka + pyarrow), on one topic
# of ~250-byte JSON order events, in one run. Writes benches/results/kafka.md.
#
# Starts its own broker (tansu, memory engine: the fast one) on 127.0.0.1:$BENCH_KAFKA_PORT
# (default 19093) and stops it at the end.
#
#   BENCH_RECORDS     records to load (default 2000000)
#   BENCH_PARTITIONS  partitions (default 12)
#   BENCH_RUNS        timed runs of each, alternating (default 3)
#   BENCH_KAFKA_BATCH records per producer batch in the loaded topic (default 200: full batches,
#                     as a producer working through a backlog writes them; 1 is the worst case
#                     for the per-record overhead all the consumers pay). tansu's memory engine
#                     skips the rest of a batch when a fetch starts inside it, as after a paused
#                     partition resumes: the row check then fails the run
#   BENCH_SKIP_BUILD=1  use the existing release binaries
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

records="${BENCH_RECORDS:-2000000}"
partitions="${BENCH_PARTITIONS:-12}"
port="${BENCH_KAFKA_PORT:-19093}"
kbatch="${BENCH_KAFKA_BATCH:-200}"

step "toolchain"
ensure_rust
ensure_python_env
py="$SLUICE_VENV/bin/python"

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --release (sluice and the bare consume loop)"
  cargo build --release --bin sluice --bin kafka-bare
fi
bin="$CARGO_TARGET_DIR/release/sluice"
bare="$CARGO_TARGET_DIR/release/kafka-bare"
[ -x "$bin" ] && [ -x "$bare" ] || { echo "missing release binaries" >&2; exit 1; }

step "broker: tansu (memory engine) on 127.0.0.1:$port"
stop_tansu "$port"
start_tansu "$port" memory
trap 'stop_tansu "$port"' EXIT

topic="bench-orders-$(date +%s)"
step "load: $records records over $partitions partitions into $topic, $kbatch per batch"
"$py" benches/kafka_bench.py load --brokers "127.0.0.1:$port" --topic "$topic" --count "$records" --partitions "$partitions" \
  --batch-records "$kbatch"

step "compare"
"$py" benches/kafka_bench.py compare --brokers "127.0.0.1:$port" --topic "$topic" --count "$records" \
  --partitions "$partitions" --runs "${BENCH_RUNS:-3}" --sluice "$bin" --bare "$bare" \
  --kafka-batch "$kbatch" --results benches/results/kafka.md
