#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing (idempotently), starts the
# services the tests need, then runs fmt, clippy, every test, and the README's quickstart check.
#
#   scripts/test.sh              # everything
#   SLUICE_SKIP_LINT=1 scripts/test.sh   # tests only
#
# Caches live outside the clone: $SLUICE_CACHE (default ~/.cache/sluice) holds the cargo target
# directory, the Python virtualenv and service binaries. SLUICE_PREBUILT_BIN may point at a
# directory of prebuilt service binaries (tansu, garage) to copy instead of compiling them.
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
