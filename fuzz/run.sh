#!/usr/bin/env bash
# Fuzz every target (or the ones named) for FUZZ_SECONDS each (default 600), FUZZ_JOBS at a time
# (default 2), then merge what each found that adds coverage into fuzz/corpus/<target>/ and
# print one line of figures per target. Not CI: needs nightly Rust and cargo-fuzz
# (`cargo +nightly install cargo-fuzz --locked`). A crash stops that target; libFuzzer leaves the
# input in fuzz/artifacts/<target>/: copy it to fuzz/regressions/<target>/ and fix the bug.
#
#   fuzz/run.sh                     # all six, 10 minutes each
#   FUZZ_SECONDS=60 fuzz/run.sh json csv
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-600}"
jobs="${FUZZ_JOBS:-2}"
target_dir="${FUZZ_TARGET_DIR:-${SLUICE_CACHE:-$HOME/.cache/sluice}/fuzz-target}"
work="${FUZZ_WORK:-${SLUICE_CACHE:-$HOME/.cache/sluice}/fuzz-work}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)

# -s none: the decoders are safe Rust, so no sanitizer is needed to see a panic, an abort, a hang
# (-timeout) or an allocation above -rss_limit_mb/-malloc_limit_mb; it runs several times faster.
cargo +nightly fuzz build -s none --target-dir "$target_dir"

run_one() {
  local t="$1" dir="$work/$1" rc=0
  rm -rf "$dir" && mkdir -p "$dir/corpus"
  # A fresh corpus, seeded from the repository's, so each run's figures stand alone.
  cargo +nightly fuzz run -s none --target-dir "$target_dir" "$t" "$dir/corpus" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -print_final_stats=1 >"$dir/log" 2>&1 || rc=$?
  echo "$rc" >"$dir/rc"
}

running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n || true; running=$((running - 1)); fi
done
wait || true

printf '| target | exit | runs | execs/s | coverage (edges) | features | corpus found | added to the repo | peak RSS |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for t in "${targets[@]}"; do
  dir="$work/$t"
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$dir/log" | grep -o '[0-9]*$' || echo '?')
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$dir/log" | grep -o '[0-9]*$' || echo '?')
  rss=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$dir/log" | grep -o '[0-9]*$' || echo '?')
  last=$(grep -E '^#[0-9]+' "$dir/log" | tail -1)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  found=$(find "$dir/corpus" -type f | wc -l)
  # Add to the repository's corpus the inputs that reach coverage it does not (libFuzzer's
  # -merge=1 keeps what corpus/<target> has, the named seeds of make_seeds.py included): new
  # seeds for the next run and inputs for tests/it/fuzz_corpora.rs.
  before=$(find "corpus/$t" -type f | wc -l)
  cargo +nightly fuzz run -s none --target-dir "$target_dir" "$t" "corpus/$t" "$dir/corpus" -- -merge=1 \
    >"$dir/merge.log" 2>&1 || true
  kept=$(( $(find "corpus/$t" -type f | wc -l) - before ))
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s MiB |\n' "$t" "$(cat "$dir/rc")" "$runs" "$speed" "$cov" "$ft" \
    "$found" "$kept" "$rss"
done
