#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing (idempotently), then runs
# fmt, clippy, every test, and the README's quickstart check. (Today's components need no external
# service; connectors that do will start theirs from here.)
#
#   scripts/test.sh              # everything
#   SLUICE_SKIP_LINT=1 scripts/test.sh   # tests only
#
# Caches live outside the clone: $SLUICE_CACHE (default ~/.cache/sluice) holds the cargo target
# directory and the Python virtualenv (pyarrow, duckdb) built from scripts/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

step "toolchain"
ensure_rust
ensure_python_env
export PATH="$SLUICE_VENV/bin:$PATH"

if [ "${SLUICE_SKIP_LINT:-0}" != 1 ]; then
  step "cargo fmt --check"
  cargo fmt --all --check
  step "cargo clippy --all-targets -- -D warnings"
  cargo clippy --all-targets --locked -- -D warnings
fi

step "cargo test"
cargo test --locked --all-targets 2>&1 | tee "$SLUICE_CACHE/last-test.log"

step "README quickstart: run it and read the Parquet back with pyarrow"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
SLUICE_OUT="$out" "$CARGO_TARGET_DIR/debug/sluice" run --no-progress pipelines/quickstart.toml
python scripts/check_quickstart.py "$out/quickstart"

step "all passed"
