#!/usr/bin/env bash
# Peak memory vs input size: generator → Parquet pipelines at 1,000,000 and 10,000,000 records, with
# the default memory settings. Writes benches/results/memory.md and prints it.
#
#   benches/memory.sh
#   BENCH_COUNTS=1000000,10000000 BENCH_RUNS_SMALL=3 BENCH_RUNS_LARGE=2 benches/memory.sh
#
# Environment:
#   BENCH_COUNTS       comma-separated record counts (default 1000000,10000000)
#   BENCH_RUNS_SMALL   runs at the smallest count (default 3)
#   BENCH_RUNS_LARGE   runs at the other counts (default 2)
#   BENCH_SWEEP_COUNTS more counts, one run each, to show where the peak levels off
#                      (default 2000000,5000000,20000000,40000000; empty to skip)
#   BENCH_RESULTS      where to write the Markdown (default benches/results/memory.md)
#   BENCH_VARIANTS     quickstart,plain (default both; see benches/results/README.md)
#   BENCH_SKIP_BUILD=1 use the existing release binary
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

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

step "memory runs"
"$py" benches/harness.py memory --sluice "$bin" \
  --counts "${BENCH_COUNTS:-1000000,10000000}" \
  --runs-small "${BENCH_RUNS_SMALL:-3}" --runs-large "${BENCH_RUNS_LARGE:-2}" \
  --sweep-counts "${BENCH_SWEEP_COUNTS-2000000,5000000,20000000,40000000}" \
  --variants "${BENCH_VARIANTS:-quickstart,plain}" \
  --results "${BENCH_RESULTS:-benches/results/memory.md}"
