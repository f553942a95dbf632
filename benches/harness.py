#!/usr/bin/env python3
"""End-to-end benchmark harness for sluice (driven by benches/compare_duckdb.sh and
benches/memory.sh).

Subcommands:
  gen-data    generate N order events as one NDJSON file, with sluice's own generator
  compare     NDJSON -> SQL filter/projection -> Parquet (zstd): sluice vs DuckDB (threads=1)
  duckdb-job  one DuckDB run (a child process of `compare`, so that it is measured on its own)
  memory      peak RSS / wall / CPU of generator -> Parquet pipelines at several record counts

Every measured run is one child process run under GNU time (/usr/bin/time -f "%e %U %S %M"): user +
sys CPU seconds and peak RSS (ru_maxrss of that process) come from it, wall seconds from a clock
around the child. See measure() for why not os.wait4() directly.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The generator's `orders` shape (src/source/generator.rs), as sluice and DuckDB types.
ORDERS_SLUICE = [
    ("order_id", "bigint not null"),
    ("customer_id", "varchar not null"),
    ("amount", "decimal(12,2)"),
    ("currency", "varchar not null"),
    ("country", "varchar not null"),
    ("status", "varchar not null"),
    ("quantity", "int not null"),
    ("ts", "timestamp not null"),
]
ORDERS_DUCKDB = {
    "order_id": "BIGINT",
    "customer_id": "VARCHAR",
    "amount": "DECIMAL(12,2)",
    "currency": "VARCHAR",
    "country": "VARCHAR",
    "status": "VARCHAR",
    "quantity": "INTEGER",
    "ts": "TIMESTAMP",
}
DEFAULT_QUERY = (
    "SELECT order_id, customer_id, amount, country, ts FROM orders "
    "WHERE amount >= 100 AND status <> 'cancelled'"
)
SEED = 42


# --------------------------------------------------------------------------------------------
# helpers


def toml_str(s):
    """A TOML basic string."""
    return json.dumps(str(s))


TIME_BIN = "/usr/bin/time"


def measure(cmd, log_prefix, env=None, cwd=None):
    """Runs cmd as a child process; returns wall s, cpu s (user+sys), user, sys, peak RSS KiB,
    exit code and the paths of its stdout/stderr logs.

    Wall time is taken around the child. CPU and peak RSS come from GNU time (`%U %S %M`) when
    /usr/bin/time exists: the rusage that os.wait4() returns for a child of this Python process
    would report at least this process's own RSS, because Linux carries the high-water mark of the
    (v)forked copy of the parent over the exec. Without /usr/bin/time, the wait4 figures are used."""
    out_path, err_path = Path(f"{log_prefix}.stdout"), Path(f"{log_prefix}.stderr")
    time_path = Path(f"{log_prefix}.time")
    use_time = os.access(TIME_BIN, os.X_OK)
    full = [TIME_BIN, "-f", "%e %U %S %M", "-o", str(time_path), *cmd] if use_time else list(cmd)
    with open(out_path, "wb") as so, open(err_path, "wb") as se:
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=so, stderr=se, env=env, cwd=cwd)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    user, sys_, maxrss = ru.ru_utime, ru.ru_stime, ru.ru_maxrss
    if use_time and p.returncode == 0:
        fields = time_path.read_text().strip().splitlines()[-1].split()
        user, sys_, maxrss = float(fields[1]), float(fields[2]), int(fields[3])
    return {
        "wall": wall,
        "user": user,
        "sys": sys_,
        "cpu": user + sys_,
        "maxrss_kib": maxrss,
        "rc": p.returncode,
        "stdout": out_path,
        "stderr": err_path,
    }


def check_rc(r, what):
    if r["rc"] != 0:
        sys.stderr.write(f"{what} failed with exit code {r['rc']}\n--- stderr ---\n")
        sys.stderr.write(r["stderr"].read_text(errors="replace")[-5000:])
        sys.stderr.write(f"\n--- stdout ---\n{r['stdout'].read_text(errors='replace')[-2000:]}\n")
        sys.exit(1)


def sluice_done_seconds(stderr_path):
    """The `done in X` figure of sluice's run summary, in seconds (None when absent)."""
    for line in Path(stderr_path).read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("done in "):
            tok = line.split()[2].rstrip(",")
            try:
                if tok.endswith("ms"):
                    return float(tok[:-2]) / 1000
                if tok.endswith("s"):
                    return float(tok[:-1])
            except ValueError:
                return None
    return None


def sluice_self_rss_mib(stderr_path):
    """The `peak memory (RSS) X MiB` figure of sluice's run summary (None when absent)."""
    for line in Path(stderr_path).read_text(errors="replace").splitlines():
        if line.startswith("done in ") and "peak memory (RSS)" in line:
            tail = line.split("peak memory (RSS)", 1)[1].split()
            try:
                v = float(tail[0])
            except (IndexError, ValueError):
                return None
            unit = tail[1] if len(tail) > 1 else "MiB"
            return v * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}.get(unit, 1)
    return None


def med(xs):
    return statistics.median(xs)


def fmt_num(x, digits=0):
    return f"{x:,.{digits}f}"


def med_range(xs, digits=0):
    return f"{fmt_num(med(xs), digits)} ({fmt_num(min(xs), digits)}–{fmt_num(max(xs), digits)})"


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def machine_info():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    commit = sh(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"])
    # Changes under benches/ (this harness and its results) do not change the binary measured.
    dirty = sh(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benches"])
    if dirty:
        commit += " (uncommitted changes outside benches/)"
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("nproc", sh(["nproc"])),
        ("total memory", mem),
        ("CPU", cpu),
        ("kernel", platform.release()),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("sluice commit", commit),
        ("rustc", sh(["rustc", "--version"])),
    ]


def machine_md(extra=()):
    rows = machine_info() + list(extra)
    out = ["| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# gen-data


def gen_pipeline_toml(count, out_dir):
    return f"""# Benchmark data: {count} order events as one NDJSON file (written by benches/harness.py).
[pipeline]
name = "bench-gen-data"

[sources.orders]
type = "generator"
shape = "orders"
count = {count}
seed = {SEED}

[sinks.data]
type = "file"
inputs = ["orders"]
path = {toml_str(out_dir)}
format = "json"
rotate = {{ max_bytes = "64GiB", max_age = "24h" }}
"""


def cmd_gen_data(a):
    out = Path(a.out)
    if out.exists():
        print(f"dataset cached: {out}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gen-") as tmp:
        tmp = Path(tmp)
        parts = tmp / "parts"
        toml = tmp / "gen.toml"
        toml.write_text(gen_pipeline_toml(a.records, parts))
        r = measure([a.sluice, "run", "--no-progress", str(toml)], tmp / "gen")
        check_rc(r, "sluice (dataset generation)")
        files = sorted(p for p in parts.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            sys.exit("dataset generation wrote no files")
        staged = tmp / "data.ndjson"
        if len(files) == 1:
            files[0].rename(staged)
        else:
            # Names are part-gen-0-{first position:020}: name order is record order.
            with open(staged, "wb") as dst:
                for f in files:
                    with open(f, "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
        lines = 0
        with open(staged, "rb") as f:
            while True:
                block = f.read(1 << 24)
                if not block:
                    break
                lines += block.count(b"\n")
        if lines != a.records:
            sys.exit(f"dataset has {lines} lines, expected {a.records}")
        staged.rename(out)
    print(f"dataset written: {out} ({len(files)} part file(s), {r['wall']:.1f}s)")


# --------------------------------------------------------------------------------------------
# compare


def compare_pipeline_toml(data, out_dir, query):
    schema = "\n".join(f"{c} = {toml_str(t)}" for c, t in ORDERS_SLUICE)
    return f"""# NDJSON -> SQL filter/projection -> Parquet (zstd); written by benches/harness.py.
# Default memory settings: memory_budget 512MiB, batch_size 8192, channel_capacity 4.
[pipeline]
name = "bench-ndjson-to-parquet"

[sources.orders]
type = "file"
path = {toml_str(data)}
format = {{ type = "json" }}

[sources.orders.schema]
{schema}

[transforms.filtered]
type = "sql"
inputs = ["orders"]
query = {toml_str(query)}

[sinks.out]
type = "file"
inputs = ["filtered"]
path = {toml_str(out_dir)}
format = "parquet"
compression = "zstd"
"""


def cmd_duckdb_job(a):
    """One DuckDB run; prints {"query_seconds": ...} (time around the COPY, no interpreter start)."""
    t_start = time.perf_counter()
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads={a.threads}")
    columns = dict(ORDERS_DUCKDB, **({"note": "VARCHAR"} if a.with_note else {}))
    cols = "{" + ", ".join(f"'{c}': '{t}'" for c, t in columns.items()) + "}"
    path = a.data.replace("'", "''")
    out = a.out.replace("'", "''")
    t0 = time.perf_counter()
    con.execute(
        f"CREATE VIEW orders AS SELECT * FROM read_json('{path}', "
        f"format='newline_delimited', columns={cols})"
    )
    con.execute(f"COPY ({a.query}) TO '{out}' (FORMAT parquet, COMPRESSION zstd)")
    t1 = time.perf_counter()
    print(json.dumps({"query_seconds": t1 - t0, "total_seconds": t1 - t_start, "version": duckdb.__version__}))


def output_summary(con, glob):
    """(rows, exact sum(amount) as a string, files) of a Parquet file or glob."""
    g = glob.replace("'", "''")
    n, s = con.execute(f"SELECT count(*), sum(amount) FROM read_parquet('{g}')").fetchone()
    files = con.execute(f"SELECT count(*) FROM glob('{g}')").fetchone()[0]
    return n, str(s), files


def cmd_compare(a):
    import duckdb

    data = Path(a.data).resolve()
    records = a.records
    data_bytes = data.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    con = duckdb.connect()
    con.execute("SET threads=1")
    try:
        toml_tmpl = lambda out: compare_pipeline_toml(data, out, a.query)  # noqa: E731

        def run_sluice(i, keep=False):
            out = work / f"sluice-out-{i}"
            toml = work / f"sluice-{i}.toml"
            toml.write_text(toml_tmpl(out))
            r = measure([a.sluice, "run", "--no-progress", str(toml)], work / f"sluice-{i}")
            check_rc(r, f"sluice run {i}")
            r["inner"] = sluice_done_seconds(r["stderr"])
            r["self_rss"] = sluice_self_rss_mib(r["stderr"])
            r["rows"], r["sum"], r["files"] = output_summary(con, str(out / "*.parquet"))
            r["out"] = out
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
            return r

        def run_duckdb(i, keep=False):
            out = work / f"duckdb-out-{i}.parquet"
            cmd = [sys.executable, str(Path(__file__).resolve()), "duckdb-job", "--data", str(data),
                   "--out", str(out), "--query", a.query, "--threads", str(a.duckdb_threads)]
            r = measure(cmd, work / f"duckdb-{i}")
            check_rc(r, f"duckdb run {i}")
            info = json.loads(r["stdout"].read_text().strip().splitlines()[-1])
            r["inner"] = info["query_seconds"]
            r["self_rss"] = None
            r["version"] = info["version"]
            r["rows"], r["sum"], r["files"] = output_summary(con, str(out))
            r["out"] = out
            if not keep:
                out.unlink(missing_ok=True)
            return r

        machine = machine_info()
        if a.warmup:
            print("warm-up (not counted): sluice, duckdb", flush=True)
            run_sluice("warmup")
            run_duckdb("warmup")
        runs = {"sluice": [], "duckdb": []}
        for i in range(a.runs):
            order = ["sluice", "duckdb"] if i % 2 == 0 else ["duckdb", "sluice"]
            for tool in order:
                last = i == a.runs - 1
                r = run_sluice(i, keep=last) if tool == "sluice" else run_duckdb(i, keep=last)
                runs[tool].append(r)
                print(f"run {i + 1}/{a.runs} {tool:6}: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s "
                      f"rss {r['maxrss_kib'] / 1024:.0f}MiB rows {r['rows']} sum {r['sum']}", flush=True)

        # What the DuckDB runs spend on starting Python and importing duckdb, measured alone.
        startup = []
        for i in range(a.runs):
            r = measure([sys.executable, "-c", "import duckdb; duckdb.connect().execute('SET threads=1')"],
                        work / f"duckdb-startup-{i}")
            check_rc(r, "python -c 'import duckdb'")
            startup.append(r)

        # Correctness: every run of both tools gives the same row count and exact sum(amount), and
        # the last outputs of the two tools hold the same multiset of rows.
        expected = (runs["duckdb"][0]["rows"], runs["duckdb"][0]["sum"])
        mismatches = [f"{t} run {i + 1}: rows {r['rows']} sum {r['sum']}"
                      for t in runs for i, r in enumerate(runs[t]) if (r["rows"], r["sum"]) != expected]
        s_glob = str(runs["sluice"][-1]["out"] / "*.parquet").replace("'", "''")
        d_file = str(runs["duckdb"][-1]["out"]).replace("'", "''")
        only_s = con.execute(f"SELECT count(*) FROM (SELECT * FROM read_parquet('{s_glob}') EXCEPT ALL "
                             f"SELECT * FROM read_parquet('{d_file}'))").fetchone()[0]
        only_d = con.execute(f"SELECT count(*) FROM (SELECT * FROM read_parquet('{d_file}') EXCEPT ALL "
                             f"SELECT * FROM read_parquet('{s_glob}'))").fetchone()[0]
        schema_s = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{s_glob}')").fetchall()
        schema_d = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{d_file}')").fetchall()
        schema_s = ", ".join(f"{c[0]} {c[1]}" for c in schema_s)
        schema_d = ", ".join(f"{c[0]} {c[1]}" for c in schema_d)
        out_bytes_s = sum(p.stat().st_size for p in runs["sluice"][-1]["out"].glob("*.parquet"))
        out_bytes_d = runs["duckdb"][-1]["out"].stat().st_size
        same = not mismatches and only_s == 0 and only_d == 0

        md = render_compare(a, data, records, data_bytes, runs, machine, same, mismatches, only_s, only_d,
                            schema_s, schema_d, out_bytes_s, out_bytes_d, startup)
        Path(a.results).parent.mkdir(parents=True, exist_ok=True)
        Path(a.results).write_text(md)
        print()
        print(md)
        if not same:
            sys.exit("outputs differ between sluice and DuckDB (see the results file)")
    finally:
        if a.keep_work:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def tool_stats(rs, records, data_bytes):
    return {
        "rps": [records / r["wall"] for r in rs],
        "mbps": [data_bytes / 1e6 / r["wall"] for r in rs],
        "rpcpu": [records / max(r["cpu"], 1e-3) for r in rs],
        "util": [r["cpu"] / r["wall"] for r in rs],
        "rss": [r["maxrss_kib"] / 1024 for r in rs],
        "wall": [r["wall"] for r in rs],
        "cpu": [r["cpu"] for r in rs],
        "inner": [r["inner"] for r in rs if r["inner"] is not None],
    }


def render_compare(a, data, records, data_bytes, runs, machine, same, mismatches, only_s, only_d,
                   schema_s, schema_d, out_bytes_s, out_bytes_d, startup):
    st = {t: tool_stats(runs[t], records, data_bytes) for t in runs}
    ver = runs["duckdb"][0]["version"]
    L = []
    L.append("# NDJSON file → SQL filter/projection → Parquet (zstd): sluice vs DuckDB")
    L.append("")
    L.append(f"Generated by `benches/compare_duckdb.sh` (BENCH_RECORDS={records}, BENCH_RUNS={a.runs}). "
             "Each run is one process, measured from outside: wall seconds around the process, CPU "
             "seconds = user + sys of the process (all threads) and peak RSS = `ru_maxrss`, both from "
             "`/usr/bin/time -f '%e %U %S %M'`. Rates are "
             "input records (or input bytes, MB = 10^6 bytes) divided by wall seconds or by CPU seconds. "
             f"Runs alternate between the tools{'; one untimed warm-up run of each came first' if a.warmup else ''}. "
             "Cells are median (min–max).")
    L.append("")
    L.append("| tool | records/s | MB/s | records per CPU-second | CPU-s / wall-s | peak RSS (MiB) | wall (s) | CPU (s) |")
    L.append("|---|---|---|---|---|---|---|---|")
    names = {"sluice": "sluice (release build)", "duckdb": f"DuckDB {ver} (`threads=1`, Python client)"}
    for t in ("sluice", "duckdb"):
        s = st[t]
        L.append(f"| {names[t]} | {med_range(s['rps'])} | {med_range(s['mbps'], 1)} | {med_range(s['rpcpu'])} | "
                 f"{med_range(s['util'], 2)} | {med_range(s['rss'])} | {med_range(s['wall'], 2)} | {med_range(s['cpu'], 2)} |")
    L.append("")
    r_cpu = med(st["sluice"]["rpcpu"]) / med(st["duckdb"]["rpcpu"])
    r_rps = med(st["sluice"]["rps"]) / med(st["duckdb"]["rps"])
    L.append("Ratios sluice / DuckDB, of the medians:")
    L.append("")
    L.append(f"- records per CPU-second: **{r_cpu:.2f}**")
    L.append(f"- records/s (wall): **{r_rps:.2f}**")
    L.append(f"- peak RSS: {med(st['sluice']['rss']) / med(st['duckdb']['rss']):.2f}")
    L.append("")
    L.append("Time inside the tool, without process start (sluice: `done in` of its run summary; "
             "DuckDB: around `CREATE VIEW` + `COPY`, without starting Python and importing duckdb), median (min–max):")
    L.append("")
    for t in ("sluice", "duckdb"):
        if st[t]["inner"]:
            L.append(f"- {t}: {med_range(st[t]['inner'], 2)} s "
                     f"→ {fmt_num(records / med(st[t]['inner']))} records/s")
    L.append("")
    su_wall = med([r["wall"] for r in startup])
    su_cpu = med([r["cpu"] for r in startup])
    su_rss = med([r["maxrss_kib"] / 1024 for r in startup])
    d_cpu_adj = [max(r["cpu"] - su_cpu, 1e-3) for r in runs["duckdb"]]
    d_wall_adj = [max(r["wall"] - su_wall, 1e-3) for r in runs["duckdb"]]
    rpcpu_adj = [records / c for c in d_cpu_adj]
    rps_adj = [records / w for w in d_wall_adj]
    L.append(f"DuckDB's process start (`python -c \"import duckdb; duckdb.connect()\"`, {len(startup)} runs, "
             f"medians): wall {su_wall:.2f} s, CPU {su_cpu:.2f} s, peak RSS {su_rss:.0f} MiB. Taking the median "
             "start CPU and wall off every DuckDB run (sluice's own start is not taken off; it is a few ms):")
    L.append("")
    L.append(f"- DuckDB without start: {med_range(rps_adj)} records/s, {med_range(rpcpu_adj)} records per CPU-second")
    L.append(f"- ratios sluice / DuckDB-without-start: records per CPU-second "
             f"**{med(st['sluice']['rpcpu']) / med(rpcpu_adj):.2f}**, records/s "
             f"**{med(st['sluice']['rps']) / med(rps_adj):.2f}**")
    L.append("")
    L.append("## Output check")
    L.append("")
    r0 = runs["duckdb"][0]
    L.append(f"- {'PASS' if same else 'FAIL'}: every run of both tools wrote {fmt_num(r0['rows'])} rows with "
             f"sum(amount) = {r0['sum']}" + ("" if not mismatches else "; mismatches: " + "; ".join(mismatches)))
    L.append(f"- Rows in sluice's output and not in DuckDB's (EXCEPT ALL, last run): {only_s}; "
             f"the other way round: {only_d}")
    L.append(f"- sluice: {runs['sluice'][-1]['files']} Parquet file(s), {out_bytes_s / 1e6:.1f} MB; "
             f"schema: {schema_s}")
    L.append(f"- DuckDB: 1 Parquet file, {out_bytes_d / 1e6:.1f} MB; schema: {schema_d}")
    L.append("")
    L.append("## Every run")
    L.append("")
    L.append("| run | tool | wall (s) | user (s) | sys (s) | peak RSS (MiB) | peak RSS in sluice's summary (MiB) | "
             "time inside the tool (s) | records/s | records per CPU-s |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for i in range(a.runs):
        for t in ("sluice", "duckdb"):
            r = runs[t][i]
            self_rss = f"{r['self_rss']:.1f}" if r.get("self_rss") is not None else ""
            inner = f"{r['inner']:.2f}" if r.get("inner") is not None else ""
            L.append(f"| {i + 1} | {t} | {r['wall']:.2f} | {r['user']:.2f} | {r['sys']:.2f} | "
                     f"{r['maxrss_kib'] / 1024:.0f} | {self_rss} | {inner} | {fmt_num(records / r['wall'])} | "
                     f"{fmt_num(records / max(r['cpu'], 1e-3))} |")
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append(f"- Data: `{data.name}`, {fmt_num(records)} order events as NDJSON, {data_bytes / 1e6:.1f} MB, "
             f"{data_bytes / records:.1f} bytes per record on average (generated once by sluice's `orders` "
             f"generator, seed {SEED}, through a file sink with `format = \"json\"`; cached under "
             "`$SLUICE_CACHE/bench-data`). The file is in the page cache for every run.")
    L.append(f"- Query (both tools): `{a.query}`")
    L.append("- Input types (both tools): " + ", ".join(f"`{c} {t}`" for c, t in ORDERS_SLUICE)
             + " / DuckDB `read_json(path, format='newline_delimited', columns={...})` with "
             + ", ".join(f"{t}" for t in ORDERS_DUCKDB.values()) + ".")
    L.append("- sluice: `sluice run --no-progress PIPELINE`, a file source (json, explicit schema) → sql "
             "transform → file sink (parquet, zstd), all other settings at their defaults (memory_budget "
             "512MiB, batch_size 8192, channel_capacity 4, row_group_bytes 8MiB, rotate max_bytes 128MiB / "
             "max_age 60s). One input file is one shard, so decoding runs on one task; the SQL transform and "
             "the sink are separate tasks on the multi-threaded Tokio runtime, which may use both cores.")
    L.append("- DuckDB: a Python child process (`benches/harness.py duckdb-job`): `SET threads=1`, a view over "
             "`read_json`, then `COPY (query) TO 'out.parquet' (FORMAT parquet, COMPRESSION zstd)`. Its wall "
             "time, CPU and RSS include starting Python and importing duckdb.")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append(machine_md([("DuckDB", ver)]))
    L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------------------------
# memory


MEMORY_VARIANTS = {
    "quickstart": (
        "generator → SQL (drop cancelled, add `dt`) → Parquet partitioned by day, rotate max_rows 500000 "
        "(pipelines/quickstart.toml with another count)"
    ),
    "plain": "generator → Parquet, no transform, no partitioning",
}


def memory_pipeline_toml(variant, count, out_dir):
    if variant == "quickstart":
        text = (REPO / "pipelines" / "quickstart.toml").read_text()
        # Same pipeline, another count; keep every other setting.
        if "count = 1_000_000" not in text:
            sys.exit("pipelines/quickstart.toml no longer has `count = 1_000_000`; update benches/harness.py")
        text = text.replace("count = 1_000_000", f"count = {count}")
        return text
    return f"""# generator -> Parquet, default settings (written by benches/harness.py).
[pipeline]
name = "bench-memory-plain"

[sources.orders]
type = "generator"
shape = "orders"
count = {count}
seed = {SEED}

[sinks.lake]
type = "file"
inputs = ["orders"]
path = {toml_str(Path(out_dir) / "plain")}
format = "parquet"
"""


def cmd_memory(a):
    import duckdb

    counts = [int(c) for c in a.counts.split(",")]
    runs_for = {c: (a.runs_small if c == min(counts) else a.runs_large) for c in counts}
    sweep = [int(c) for c in a.sweep_counts.split(",") if c.strip()] if a.sweep_counts else []
    sweep = [c for c in sweep if c not in runs_for]
    for c in sweep:
        runs_for[c] = 1
    all_counts = sorted(runs_for)
    variants = a.variants.split(",")
    work = Path(tempfile.mkdtemp(prefix="sluice-mem-"))
    con = duckdb.connect()
    con.execute("SET threads=1")
    machine = machine_info()
    results = {}
    try:
        for v in variants:
            for c in all_counts:
                rs = []
                for i in range(runs_for[c]):
                    out = work / f"out-{v}-{c}-{i}"
                    toml = work / f"{v}-{c}-{i}.toml"
                    toml.write_text(memory_pipeline_toml(v, c, out))
                    env = dict(os.environ, SLUICE_OUT=str(out))
                    r = measure([a.sluice, "run", "--no-progress", str(toml)], work / f"{v}-{c}-{i}", env=env,
                                cwd=str(REPO))
                    check_rc(r, f"sluice {v} {c} run {i}")
                    r["inner"] = sluice_done_seconds(r["stderr"])
                    r["self_rss"] = sluice_self_rss_mib(r["stderr"])
                    files = [p for p in out.rglob("*.parquet") if not p.name.startswith(".")]
                    g = str(out / "**" / "*.parquet").replace("'", "''")
                    r["rows"] = con.execute(f"SELECT count(*) FROM read_parquet('{g}')").fetchone()[0]
                    r["files"] = len(files)
                    r["out_bytes"] = sum(p.stat().st_size for p in files)
                    shutil.rmtree(out, ignore_errors=True)
                    rs.append(r)
                    print(f"{v} count {c} run {i + 1}/{runs_for[c]}: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s "
                          f"rss {r['maxrss_kib'] / 1024:.0f}MiB rows {r['rows']} files {r['files']}", flush=True)
                results[(v, c)] = rs
        md = render_memory(a, counts, variants, results, machine, sweep, all_counts)
        Path(a.results).parent.mkdir(parents=True, exist_ok=True)
        Path(a.results).write_text(md)
        print()
        print(md)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render_memory(a, counts, variants, results, machine, sweep, all_counts):
    L = []
    L.append("# Peak memory vs input size (generator → Parquet)")
    L.append("")
    L.append("Generated by `benches/memory.sh`. Each run is one `sluice run --no-progress` process of the "
             "release build, measured from outside with `/usr/bin/time`: peak RSS = `ru_maxrss` (`%M`), "
             "CPU = user + sys. Cells are median (min–max) over the runs. The claim under test: peak memory does not grow "
             "with the number of records, because memory is bounded by the settings below, not by the input.")
    L.append("")
    L.append("| pipeline | records | runs | peak RSS (MiB) | wall (s) | CPU (s) | records/s | output rows | files |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        for c in counts:
            rs = results[(v, c)]
            rss = [r["maxrss_kib"] / 1024 for r in rs]
            wall = [r["wall"] for r in rs]
            cpu = [r["cpu"] for r in rs]
            rows = sorted({r["rows"] for r in rs})
            files = sorted({r["files"] for r in rs})
            L.append(f"| {v} | {fmt_num(c)} | {len(rs)} | {med_range(rss)} | {med_range(wall, 2)} | "
                     f"{med_range(cpu, 2)} | {med_range([c / w for w in wall])} | "
                     f"{', '.join(fmt_num(x) for x in rows)} | {', '.join(str(x) for x in files)} |")
    L.append("")
    small, large = min(counts), max(counts)
    L.append(f"Peak RSS at {fmt_num(large)} records / at {fmt_num(small)} records (medians):")
    L.append("")
    for v in variants:
        rs_s = [r["maxrss_kib"] / 1024 for r in results[(v, small)]]
        rs_l = [r["maxrss_kib"] / 1024 for r in results[(v, large)]]
        L.append(f"- {v}: {med(rs_l):.0f} / {med(rs_s):.0f} MiB = **{med(rs_l) / med(rs_s):.2f}** "
                 f"(spread at {fmt_num(small)}: {min(rs_s):.0f}–{max(rs_s):.0f} MiB)")
    L.append("")
    if sweep:
        L.append("## Where the peak levels off")
        L.append("")
        L.append("Peak RSS over more record counts (one run each at the counts not in the table above, "
                 "the median above otherwise), and the number of Parquet files written:")
        L.append("")
        L.append("| pipeline | " + " | ".join(fmt_num(c) for c in all_counts) + " |")
        L.append("|---|" + "---|" * len(all_counts))
        for v in variants:
            cells = [f"{med([r['maxrss_kib'] / 1024 for r in results[(v, c)]]):.0f}" for c in all_counts]
            L.append(f"| {v}: peak RSS (MiB) | " + " | ".join(cells) + " |")
        for v in variants:
            cells = [", ".join(str(x) for x in sorted({r["files"] for r in results[(v, c)]})) for c in all_counts]
            L.append(f"| {v}: files written | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Pipelines and memory settings")
    L.append("")
    for v in variants:
        L.append(f"- `{v}`: {MEMORY_VARIANTS[v]}.")
    L.append("- All memory settings are the defaults: `memory_budget = \"512MiB\"` (Arrow bytes of batches in "
             "flight), `batch_size = 8192`, `channel_capacity = 4`, `shard_parallelism = 2`, one generator "
             "shard; file sink `row_group_bytes = \"8MiB\"`, `buffer_bytes = \"32MiB\"`, "
             "`max_open_files = 64`, `rotate.max_bytes = \"128MiB\"`, `rotate.max_age = \"60s\"` "
             "(quickstart also sets `rotate.max_rows = 500000`), compression zstd.")
    L.append("- Why a small run stays below the plateau: the file sink keeps a Parquet row group in memory "
             "until it reaches `row_group_bytes` (8MiB of buffered data) or 131,072 rows, and keeps files open until "
             "`rotate` closes them or the caps force it. `plain` fills several row groups even at 1,000,000 records. `quickstart` writes one folder per day (86,400 records) and, in a "
             "run shorter than `max_age`, keeps every day's file open until there are `max_open_files` (64) of "
             "them, that is after about 5,500,000 records; from then on `max_open_files` and `buffer_bytes` "
             "bound it.")
    L.append("- Output rows are counted with DuckDB after each run (quickstart drops the cancelled orders, "
             "about a quarter).")
    L.append("")
    L.append("## Every run")
    L.append("")
    L.append("| pipeline | records | run | wall (s) | user (s) | sys (s) | peak RSS (MiB) | peak RSS in sluice's summary (MiB) "
             "| sluice `done in` (s) | output MB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        for c in all_counts:
            for i, r in enumerate(results[(v, c)]):
                inner = f"{r['inner']:.2f}" if r["inner"] is not None else "?"
                self_rss = f"{r['self_rss']:.1f}" if r["self_rss"] is not None else "?"
                L.append(f"| {v} | {fmt_num(c)} | {i + 1} | {r['wall']:.2f} | {r['user']:.2f} | {r['sys']:.2f} | "
                         f"{r['maxrss_kib'] / 1024:.0f} | {self_rss} | {inner} | {r['out_bytes'] / 1e6:.1f} |")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append(machine_md())
    L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("gen-data", help="generate the NDJSON dataset with sluice")
    g.add_argument("--sluice", required=True)
    g.add_argument("--records", type=int, required=True)
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_gen_data)

    c = sub.add_parser("compare", help="sluice vs DuckDB: NDJSON -> SQL -> Parquet")
    c.add_argument("--sluice", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--records", type=int, required=True)
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--warmup", type=int, default=1, help="1: one untimed run of each tool first")
    c.add_argument("--query", default=DEFAULT_QUERY)
    c.add_argument("--duckdb-threads", type=int, default=1)
    c.add_argument("--results", required=True)
    c.add_argument("--keep-work", action="store_true")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("duckdb-job", help="one DuckDB run (used by compare)")
    d.add_argument("--data", required=True)
    d.add_argument("--with-note", action="store_true", help="the records have a `note` column (benches/suite.py)")
    d.add_argument("--out", required=True)
    d.add_argument("--query", required=True)
    d.add_argument("--threads", type=int, default=1)
    d.set_defaults(func=cmd_duckdb_job)

    m = sub.add_parser("memory", help="peak RSS of generator -> Parquet at several counts")
    m.add_argument("--sluice", required=True)
    m.add_argument("--counts", default="1000000,10000000")
    m.add_argument("--runs-small", type=int, default=3)
    m.add_argument("--runs-large", type=int, default=2)
    m.add_argument("--variants", default="quickstart,plain")
    m.add_argument("--sweep-counts", default="", help="more counts, one run each, to see where the peak levels off")
    m.add_argument("--results", required=True)
    m.set_defaults(func=cmd_memory)

    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
