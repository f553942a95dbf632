#!/usr/bin/env python3
"""Checks that no secret the tests used appears in any output of the test suite.

  check_secrets.py --logs DIR [--logs DIR ...] [--file F ...]
  check_secrets.py --self-test

The secrets are every string constant of tests/it/*.rs whose name holds PASSWORD, TOKEN or
SECRET (the convention for test secrets), and the S3 secret key of the test server
($SLUICE_TEST_S3_SECRET). The outputs are every file under the --logs folders (each sluice
process the tests ran, kept by tests/tee_output.sh) and the --file files (the cargo test output).
Exits 1 naming the file, the line number and the constant for each one found; the secret itself is
never printed.
"""

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

CONST = re.compile(r'const\s+(\w*(?:PASSWORD|TOKEN|SECRET)\w*)\s*:\s*&str\s*=\s*"([^"]+)"')
ROOT = Path(__file__).resolve().parent.parent


def secrets(sources):
    found = {}
    for path in sorted(sources):
        for name, value in CONST.findall(path.read_text()):
            found[value] = f"{path.name}:{name}"
    if os.environ.get("SLUICE_TEST_S3_SECRET"):
        found[os.environ["SLUICE_TEST_S3_SECRET"]] = "SLUICE_TEST_S3_SECRET"
    return found


def scan(known, files):
    hits, lines = [], 0
    for f in files:
        with open(f, "rb") as fh:
            for n, raw in enumerate(fh, start=1):
                lines += 1
                text = raw.decode("utf-8", "replace")
                for value, name in known.items():
                    if value in text:
                        hits.append(f"{f}:{n}: {name}")
    return hits, lines


def self_test():
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "x.rs"
        src.write_text('const API_TOKEN: &str = "canary-7f3e";\nconst OTHER: &str = "not-secret";\n')
        log = Path(d) / "sluice-1.log"
        log.write_text("ok\nerror: refused token canary-7f3e\nnot-secret\n")
        known = {k: v for k, v in secrets([src]).items() if v.startswith("x.rs")}
        hits, _ = scan(known, [log])
        assert list(known) == ["canary-7f3e"], known
        assert hits == [f"{log}:2: x.rs:API_TOKEN"], hits
    print("check_secrets self-test: a planted secret is found, a non-secret constant is not")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logs", action="append", default=[])
    ap.add_argument("--file", action="append", default=[])
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    if a.self_test:
        self_test()
        return
    known = secrets((ROOT / "tests" / "it").glob("*.rs"))
    files = [p for d in a.logs for p in sorted(Path(d).rglob("*")) if p.is_file()] + [Path(f) for f in a.file]
    if not files:
        sys.exit("check_secrets: no output to check (was SLUICE_TEST_LOG_DIR set for the tests?)")
    hits, lines = scan(known, files)
    if hits:
        print("secrets found in test output:\n" + "\n".join(hits), file=sys.stderr)
        sys.exit(1)
    print(f"check_secrets: {len(known)} secrets, {len(files)} files, {lines} lines: none found")


if __name__ == "__main__":
    main()
