#!/usr/bin/env bash
# Soak run, not part of CI: Kafka -> Parquet at a steady produce rate for a long time, the sluice
# process sampled from /metrics (resident memory, file descriptors, threads, Tokio tasks, lag).
# Writes benches/results/soak.md; exits non-zero when the run lost or duplicated records, did
# not drain, or did not stop cleanly on SIGTERM.
#
# Starts its own broker (tansu, sqlite engine: see benches/soak.py's Producer) on 127.0.0.1:$BENCH_KAFKA_PORT (default 19095) and
# stops it at the end.
#
#   SOAK_MINUTES      length of the run (default 30)
#   SOAK_RATE         records per second produced (default 1000)
#   SOAK_INTERVAL     seconds between samples (default 10)
#   BENCH_SKIP_BUILD=1  use the existing release binary
#   SOAK_BIN          run this sluice binary instead (e.g. the debug build: leaks show in any build)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

port="${BENCH_KAFKA_PORT:-19095}"
step "toolchain"
ensure_rust
ensure_python_env
py="$SLUICE_VENV/bin/python"
if [ -n "${SOAK_BIN:-}" ]; then
  bin="$SOAK_BIN"
  build="the binary $(basename "$(dirname "$bin")")/$(basename "$bin")"
else
  if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    step "cargo build --release"
    cargo build --release --bin sluice
  fi
  bin="$CARGO_TARGET_DIR/release/sluice"
  build="release build"
fi
[ -x "$bin" ] || { echo "no sluice binary at $bin" >&2; exit 1; }

step "broker: tansu (sqlite engine) on 127.0.0.1:$port"
stop_tansu "$port"
start_tansu "$port" sqlite
out="$(mktemp -d)"
trap 'stop_tansu "$port"; rm -rf "$out"' EXIT

step "soak: ${SOAK_MINUTES:-30} minutes at ${SOAK_RATE:-1000} records/s"
"$py" benches/soak.py run --brokers "127.0.0.1:$port" --topic "soak-$(date +%s)" \
  --rate "${SOAK_RATE:-1000}" --seconds "$(( ${SOAK_MINUTES:-30} * 60 ))" --interval "${SOAK_INTERVAL:-10}" \
  --sluice "$bin" --build "$build" --out "$out" --results benches/results/soak.md
