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

# Prebuilt test-server binaries (tansu, garage) are copied from $SLUICE_PREBUILT_BIN when it holds
# them (CI and the team's machines: ../shared/bin beside the clone); otherwise they are built from
# crates.io once (about 15 minutes each) and cached in $SLUICE_CACHE/bin.
export SLUICE_BIN="$SLUICE_CACHE/bin"
mkdir -p "$SLUICE_BIN"
if [ -z "${SLUICE_PREBUILT_BIN:-}" ]; then
  for d in "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/bin" /work/shared/bin; do
    if [ -d "$d" ]; then SLUICE_PREBUILT_BIN="$d"; break; fi
  done
fi

# ensure_service_binary NAME CRATE VERSION FEATURES
ensure_service_binary() {
  local name=$1 crate=$2 version=$3 features=$4
  if [ -x "$SLUICE_BIN/$name" ] && "$SLUICE_BIN/$name" --version 2>/dev/null | grep -q "$version"; then
    return
  fi
  if [ -n "${SLUICE_PREBUILT_BIN:-}" ] && [ -x "$SLUICE_PREBUILT_BIN/$name" ] \
    && "$SLUICE_PREBUILT_BIN/$name" --version 2>/dev/null | grep -q "$version"; then
    cp "$SLUICE_PREBUILT_BIN/$name" "$SLUICE_BIN/$name"
    return
  fi
  step "installing $crate $version from crates.io (once; cached in $SLUICE_BIN)"
  local args=(install "$crate" --version "$version" --locked --root "$SLUICE_CACHE/tools")
  if [ -n "$features" ]; then args+=(--features "$features"); fi
  CARGO_TARGET_DIR="$SLUICE_CACHE/tools-target" cargo "${args[@]}"
  cp "$SLUICE_CACHE/tools/bin/$name" "$SLUICE_BIN/$name"
}

# port_open PORT: something listens on 127.0.0.1:PORT.
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_port PORT SECONDS LOG
wait_port() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    if port_open "$1"; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1 after $2 s; log:" >&2
  tail -n 30 "$3" >&2 || true
  return 1
}

# start_tansu PORT ENGINE(sqlite|memory): a Kafka-protocol broker on 127.0.0.1:PORT. The sqlite
# engine has correct end offsets (tests); the memory engine is fast but its ListOffsets(latest) is
# wrong after multi-record batches (benchmarks that know their record count).
start_tansu() {
  local port=$1 engine=$2
  if port_open "$port"; then return; fi
  ensure_service_binary tansu tansu 0.6.0 dynostore,libsql
  local dir="$SLUICE_CACHE/run/tansu-$port"
  rm -rf "$dir"
  mkdir -p "$dir"
  local url="memory://tansu/"
  if [ "$engine" = sqlite ]; then url="sqlite://tansu.db"; fi
  # The sqlite path is relative to the working directory, so start it from its own folder.
  (cd "$dir" && exec "$SLUICE_BIN/tansu" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "$url" >"$dir/broker.log" 2>&1) &
  echo $! >"$dir/pid"
  wait_port "$port" 30 "$dir/broker.log"
}

stop_tansu() {
  local dir="$SLUICE_CACHE/run/tansu-$1"
  if [ -f "$dir/pid" ]; then kill "$(cat "$dir/pid")" 2>/dev/null || true; rm -f "$dir/pid"; fi
}

# ensure_debian_packages PKG...: installs the missing ones (rdkafka builds librdkafka with OpenSSL
# from source and needs libssl-dev).
ensure_debian_packages() {
  local missing=()
  local p
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo=sudo; fi
    $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}
