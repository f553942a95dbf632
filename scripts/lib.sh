# Shared helpers for the project's scripts (sourced, not run).
# shellcheck shell=bash

export SLUICE_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}"
export SLUICE_VENV="${SLUICE_VENV:-$SLUICE_CACHE/venv}"
mkdir -p "$SLUICE_CACHE"

step() { printf '\n==> %s\n' "$*"; }

# Rust comes from rustup; install it only when cargo is missing entirely.
ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      echo "cargo not found: install Rust from https://rustup.rs" >&2
      exit 1
    fi
  fi
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
}

# A virtualenv with the Python tools tests and benches use (pyarrow to read output, duckdb as the
# benchmark baseline). Reinstalled only when scripts/requirements.txt changes.
ensure_python_env() {
  local req=scripts/requirements.txt stamp="$SLUICE_VENV/.requirements.sha"
  local want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ -x "$SLUICE_VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  python3 -m venv "$SLUICE_VENV"
  "$SLUICE_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
}
