#!/usr/bin/env bash
# Runs the sluice binary given first with the other arguments, and keeps a copy of its stdout and
# stderr in $SLUICE_TEST_LOG_DIR/sluice-PID.log for scripts/check_secrets.py. `exec` keeps the
# PID: signals and kill -9 from the tests reach sluice itself.
# - Output to a pipe (a test capturing it) is passed through `tee`: the test sees it unchanged.
# - Output to a regular file (a test's log, which it may read while sluice runs) is left alone,
#   so the test reads what sluice wrote as soon as it wrote it; a `tail` follows the file into
#   the copy until sluice exits.
set -u
bin=$1
shift
log="$SLUICE_TEST_LOG_DIR/sluice-$$.log"
out=$(readlink "/proc/$$/fd/1" || true)
err=$(readlink "/proc/$$/fd/2" || true)
follow() { tail --pid=$$ -c +1 -f "$1" >>"$log" 2>/dev/null & }
if [ -f "$out" ]; then follow "$out"; fi
if [ -f "$err" ] && [ "$err" != "$out" ]; then follow "$err"; fi
if [ -f "$out" ] && [ -f "$err" ]; then
  exec "$bin" "$@"
elif [ -f "$out" ]; then
  exec "$bin" "$@" 2> >(tee -a "$log" >&2)
elif [ -f "$err" ]; then
  exec "$bin" "$@" > >(tee -a "$log")
else
  exec "$bin" "$@" > >(tee -a "$log") 2> >(tee -a "$log" >&2)
fi
