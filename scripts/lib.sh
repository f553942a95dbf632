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

# ensure_venv DIR REQUIREMENTS...: a virtualenv at DIR with the requirements files installed;
# reinstalled only when one of the files changes.
ensure_venv() {
  local dir=$1 stamp="$1/.requirements.sha" want
  shift
  want="$(cat "$@" | sha256sum | cut -d' ' -f1)"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  python3 -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check -r "${@: -1}"
  echo "$want" > "$stamp"
}

# A virtualenv with the Python tools tests and benches use (pyarrow to read output, duckdb as the
# benchmark baseline).
ensure_python_env() {
  ensure_venv "$SLUICE_VENV" scripts/requirements.txt
}

# The benchmark suite's virtualenv: the tests' tools plus the baselines and the chart (Quix
# Streams, matplotlib), kept apart so that the test suite does not install them.
export SLUICE_BENCH_VENV="${SLUICE_BENCH_VENV:-$SLUICE_CACHE/bench-venv}"
ensure_bench_env() {
  ensure_venv "$SLUICE_BENCH_VENV" scripts/requirements.txt scripts/requirements-bench.txt
}

# docker-compose v1 in a virtualenv of its own ($SLUICE_CACHE/compose-venv), for validating
# deploy/docker-compose.yml; no container engine is needed for `docker-compose config`.
export SLUICE_COMPOSE_VENV="${SLUICE_COMPOSE_VENV:-$SLUICE_CACHE/compose-venv}"
ensure_compose_env() {
  local req=scripts/requirements-compose.txt stamp="$SLUICE_COMPOSE_VENV/.requirements.sha"
  local want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ -x "$SLUICE_COMPOSE_VENV/bin/docker-compose" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  python3 -m venv "$SLUICE_COMPOSE_VENV"
  local pip=("$SLUICE_COMPOSE_VENV/bin/pip" install --quiet --disable-pip-version-check)
  "${pip[@]}" "cython==0.29.37" "setuptools==65.5.0" "wheel==0.48.0"
  "${pip[@]}" --no-build-isolation "pyyaml==5.4.1"
  "${pip[@]}" -r "$req"
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

# start_garage PORT: a single-node Garage S3 server on 127.0.0.1:PORT (region "garage", RPC on
# PORT+1, admin on PORT+3), with one access key whose id and secret are written to
# $SLUICE_CACHE/run/garage-PORT/env (sourced by the tests; never printed). Buckets are created by
# the tests themselves through the S3 API... except that Garage's S3 API cannot create buckets for a
# key without the owner flag, so the key is given `--create-bucket`.
start_garage() {
  local port=$1
  local dir="$SLUICE_CACHE/run/garage-$port"
  ensure_service_binary garage garage 2.5.0 ""
  if port_open "$port" && [ -f "$dir/env" ]; then return; fi
  if [ -f "$dir/pid" ]; then kill "$(cat "$dir/pid")" 2>/dev/null || true; sleep 0.5; fi
  rm -rf "$dir"
  mkdir -p "$dir/meta" "$dir/data"
  cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((port + 1))"
rpc_public_addr = "127.0.0.1:$((port + 1))"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((port + 3))"
TOML
  chmod 600 "$dir/garage.toml"
  local g=("$SLUICE_BIN/garage" -c "$dir/garage.toml")
  ("${g[@]}" server >"$dir/server.log" 2>&1) &
  echo $! >"$dir/pid"
  wait_port "$port" 30 "$dir/server.log"
  local node i
  for ((i = 0; i < 100; i++)); do
    node="$("${g[@]}" status 2>/dev/null | awk '/NO ROLE ASSIGNED|^[0-9a-f]{16} /{print $1; exit}')"
    if [ -n "$node" ]; then break; fi
    sleep 0.2
  done
  if [ -z "$node" ]; then echo "garage did not report its node id; log:" >&2; tail -n 30 "$dir/server.log" >&2; return 1; fi
  "${g[@]}" layout assign -z dc1 -c 1G "$node" >/dev/null
  "${g[@]}" layout apply --version 1 >/dev/null
  "${g[@]}" key create sluice-test >/dev/null
  "${g[@]}" key allow --create-bucket sluice-test >/dev/null
  local info
  info="$("${g[@]}" key info sluice-test --show-secret)"
  {
    echo "export SLUICE_TEST_S3_ENDPOINT=http://127.0.0.1:$port"
    echo "export SLUICE_TEST_S3_KEY_ID=$(awk -F': *' '/Key ID/{print $2; exit}' <<<"$info")"
    echo "export SLUICE_TEST_S3_SECRET=$(awk -F': *' '/Secret key/{print $2; exit}' <<<"$info")"
  } >"$dir/env"
  chmod 600 "$dir/env"
}

stop_garage() {
  local dir="$SLUICE_CACHE/run/garage-$1"
  if [ -f "$dir/pid" ]; then kill "$(cat "$dir/pid")" 2>/dev/null || true; rm -f "$dir/pid"; fi
}

# start_postgres: a PostgreSQL server on 127.0.0.1:5432 with trust auth for local TCP (the
# machine's own, started if it is down; installed from Debian's packages if missing), and a
# database `sluice_test` for the tests (each test makes its own schema in it).
start_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    ensure_debian_packages postgresql postgresql-client
  fi
  local version
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  if ! port_open 5432; then
    step "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_port 5432 30 "/var/log/postgresql/postgresql-$version-main.log"
  fi
  local psql=(psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt)
  if ! "${psql[@]}" -c 'select 1' >/dev/null 2>&1; then
    # Trust local TCP connections (a test machine only).
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    sleep 1
  fi
  if [ "$("${psql[@]}" -c "select 1 from pg_database where datname = 'sluice_test'")" != 1 ]; then
    "${psql[@]}" -c 'create database sluice_test' >/dev/null
  fi
}
