#!/usr/bin/env python3
"""PostgreSQL benchmarks (driven by benches/postgres.sh): order events into and out of a
PostgreSQL table, with sluice and with the tools one would use otherwise, on the same records and
the same server, in one run.

Scenarios (`compare --only` takes a comma-separated list of these names):
  psql-copy             psql `\\copy ... FROM 'orders.csv' (FORMAT csv)`: the server's own limit
  sluice-insert         sluice: NDJSON file -> postgres sink, mode = "insert"
  sluice-upsert         sluice: NDJSON file -> postgres sink, mode = "upsert" on the primary key
  sluice-pg-to-parquet  sluice: postgres source (shards = 1) -> Parquet files
  sluice-pg-to-parquet-auto  the same with the file sink's dictionary = "auto" (mostly-distinct
                        columns written plain instead of dictionary-encoded)
  python-pg-to-parquet  Python: psycopg 3 COPY TO STDOUT -> pyarrow -> Parquet files

Every sink run writes a fresh ordinary (logged) table with the same columns, counted and dropped
after the run; the source runs read one table loaded once (not timed) with psql. Parquet is zstd,
files of ROWS_PER_FILE rows on both sides.

Subcommands:
  python-pg-to-parquet  the Python baseline reading a table into Parquet files
  compare               run everything R times, alternating, check outputs, write the Markdown report

Each measured run is one child process under GNU time (user+sys CPU seconds and peak RSS of that
process only). The server's work is not in those figures: it is reported beside, as the CPU the
PostgreSQL processes of this machine used during the run (read from /proc).
"""

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROWS_PER_FILE = 1_000_000
SCHEMA = harness.ORDERS_SLUICE + [("note", "varchar")]
PG_TYPES = {"order_id": "bigint", "customer_id": "text", "amount": "numeric(12,2)", "currency": "text",
            "country": "text", "status": "text", "quantity": "integer", "ts": "timestamp", "note": "text"}
ARROW = pa.schema([(c, {"bigint": pa.int64(), "text": pa.string(), "numeric(12,2)": pa.decimal128(12, 2),
                        "integer": pa.int32(), "timestamp": pa.timestamp("us")}[PG_TYPES[c]]) for c, _ in SCHEMA])
NAMES = [c for c, _ in SCHEMA]
SINKS = ["psql-copy", "sluice-insert", "sluice-upsert"]
SOURCES = ["sluice-pg-to-parquet", "sluice-pg-to-parquet-auto", "python-pg-to-parquet"]
SOURCE_TABLE = "bench.src"


def ddl(table, key=False):
    cols = [f"{c} {PG_TYPES[c]}{' not null' if 'not null' in t else ''}" for c, t in SCHEMA]
    if key:
        cols.append("primary key (order_id)")
    return f"CREATE TABLE {table} ({', '.join(cols)})"


# --------------------------------------------------------------------------------------------
# the Python baseline


class RollingParquet:
    """zstd Parquet files of ROWS_PER_FILE rows in a folder."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer, self.rows, self.files = None, 0, 0

    def write(self, table):
        import pyarrow.parquet as pq

        while table.num_rows:
            if self.writer is None:
                path = self.dir / f"part-{self.files:05d}.parquet"
                self.writer = pq.ParquetWriter(path, ARROW, compression="zstd")
            take = min(table.num_rows, ROWS_PER_FILE - self.rows)
            self.writer.write_table(table.slice(0, take))
            self.rows += take
            table = table.slice(take)
            if self.rows >= ROWS_PER_FILE:
                self.close()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer, self.rows, self.files = None, 0, self.files + 1


def copy_binary(cur, table, out, chunk_rows=65536):
    """Binary COPY decoded by psycopg (C loaders) into Python values, transposed per chunk into
    column lists and built into Arrow arrays with explicit types."""
    sql = f"COPY (SELECT {', '.join(NAMES)} FROM {table}) TO STDOUT (FORMAT binary)"
    n = 0
    with cur.copy(sql) as copy:
        copy.set_types(["int8", "text", "numeric", "text", "text", "text", "int4", "timestamp", "text"])
        rows = copy.rows()
        while chunk := list(itertools.islice(rows, chunk_rows)):
            cols = list(zip(*chunk))
            out.write(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, ARROW)], schema=ARROW))
            n += len(chunk)
    return n


def copy_csv(cur, table, out, block_bytes=16 << 20):
    """CSV COPY, parsed by pyarrow.csv (C++, multi-threaded) in blocks of whole rows: the server
    sends one row per CopyData message, so a block cut between messages is cut between rows (the
    values here hold no newlines; otherwise ParseOptions(newlines_in_values=True) is needed).
    (Parsing a block on a second thread while the next one is read gained nothing on 2 cores.)"""
    import pyarrow.csv as pc

    read = pc.ReadOptions(column_names=NAMES)
    # PostgreSQL's CSV: NULL is an empty unquoted field, an empty string is "".
    conv = pc.ConvertOptions(column_types=ARROW, null_values=[""], strings_can_be_null=True,
                             quoted_strings_can_be_null=False)
    sql = f"COPY (SELECT {', '.join(NAMES)} FROM {table}) TO STDOUT (FORMAT csv)"
    n, buf = 0, bytearray()

    def flush():
        t = pc.read_csv(pa.py_buffer(bytes(buf)), read_options=read, convert_options=conv)
        buf.clear()
        out.write(t)
        return t.num_rows

    with cur.copy(sql) as copy:
        for data in copy:
            buf += data
            if len(buf) >= block_bytes:
                n += flush()
    if buf:
        n += flush()
    return n


# Text COPY + pyarrow.csv is the default because it is the faster: on 1,000,000 rows of this table
# (2 cores, PostgreSQL 15 on the same machine) it took 1.8-2.0 s wall and 1.3-1.6 s CPU, binary COPY
# through copy.rows() 4.4-5.4 s wall and 3.9-4.3 s CPU (a Python Decimal and datetime per value,
# then pa.array over them). `--method binary` runs the other one.
METHODS = {"csv": copy_csv, "binary": copy_binary}


def cmd_python(a):
    import psycopg

    out = RollingParquet(a.out)
    with psycopg.connect(a.url) as conn, conn.cursor() as cur:
        n = METHODS[a.method](cur, a.table, out)
    out.close()
    print(json.dumps({"rows": n, "method": a.method}))


# --------------------------------------------------------------------------------------------
# compare


def sluice_sink_toml(a, table, mode):
    cols = "\n".join(f"{c} = {harness.toml_str(t)}" for c, t in SCHEMA)
    key = '\nkey = ["order_id"]' if mode == "upsert" else ""
    return f"""[pipeline]
name = "bench-pg-{mode}"
batch_size = 8192

[sources.orders]
type = "file"
path = {harness.toml_str(a.data)}
format = {{ type = "json" }}

[sources.orders.schema]
{cols}

[sinks.pg]
type = "postgres"
inputs = ["orders"]
url = {harness.toml_str(a.url)}
table = "{table}"
mode = "{mode}"{key}
"""


def sluice_source_toml(a, out_dir, dictionary="always"):
    return f"""[pipeline]
name = "bench-pg-to-parquet"
batch_size = 8192

[sources.src]
type = "postgres"
url = {harness.toml_str(a.url)}
table = "{SOURCE_TABLE}"
shards = 1

[sinks.lake]
type = "file"
inputs = ["src"]
path = {harness.toml_str(out_dir)}
format = "parquet"
rotate = {{ max_rows = {ROWS_PER_FILE} }}
dictionary = "{dictionary}"
"""


def psql(a, command):
    return ["psql", a.url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", command]


def copy_in(a, table, csv):
    path = str(csv).replace("'", "''")
    return psql(a, f"\\copy {table} FROM '{path}' WITH (FORMAT csv)")


def server_cpu():
    """CPU seconds used so far by this machine's PostgreSQL processes: live ones, plus the reaped
    children the postmaster has collected (None when no server runs here)."""
    tick, total, found = os.sysconf("SC_CLK_TCK"), 0, False
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm != "postgres":
            continue
        found = True
        utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
        total += utime + stime + cutime + cstime
    return total / tick if found else None


def parquet_check(out_dir):
    import pyarrow.compute as pcmp
    import pyarrow.parquet as pq

    n, s = 0, 0
    for f in sorted(p for p in Path(out_dir).rglob("*.parquet") if not p.name.startswith(".")):
        col = pq.read_table(f, columns=["order_id"]).column(0)
        n, s = n + len(col), s + (pcmp.sum(col).as_py() or 0)
    return n, s


def ndjson_to_csv(data, csv):
    """The records once as CSV for psql (not timed); returns (rows, sum(order_id))."""
    import pyarrow.compute as pcmp
    import pyarrow.csv as pc
    import pyarrow.json as pj

    opts = pj.ParseOptions(explicit_schema=ARROW, unexpected_field_behavior="ignore")
    t = pj.read_json(data, read_options=pj.ReadOptions(block_size=8 << 20), parse_options=opts)
    pc.write_csv(t, csv, pc.WriteOptions(include_header=False))
    return t.num_rows, pcmp.sum(t.column("order_id")).as_py()


def cmd_compare(a):
    import psycopg

    names = [n for n in SINKS + SOURCES if not a.only or n in a.only.split(",")]
    unknown = set(a.only.split(",")) - set(SINKS + SOURCES) if a.only else set()
    if unknown or not names:
        sys.exit(f"--only: unknown scenario(s) {sorted(unknown)}; known: {', '.join(SINKS + SOURCES)}")
    work = Path(tempfile.mkdtemp(prefix="sluice-pgbench-"))
    csv = work / "orders.csv"
    expect = ndjson_to_csv(a.data, csv)
    if expect[0] != a.records:
        sys.exit(f"{a.data} has {expect[0]} records, expected {a.records}")
    conn = psycopg.connect(a.url, autocommit=True)
    server = {k: conn.execute(f"SHOW {k}").fetchone()[0]
              for k in ["server_version", "shared_buffers", "synchronous_commit", "wal_level", "max_wal_size"]}
    conn.execute("DROP SCHEMA IF EXISTS bench CASCADE")
    conn.execute("CREATE SCHEMA bench")
    if any(n in SOURCES for n in names):
        conn.execute(ddl(SOURCE_TABLE, key=True))
        harness.check_rc(harness.measure(copy_in(a, SOURCE_TABLE, csv), str(work / "load")), "loading bench.src")
        # Sets hint bits and the visibility map now, so that no run reads a table it also writes.
        conn.execute(f"VACUUM (FREEZE, ANALYZE) {SOURCE_TABLE}")
        got = conn.execute(f"SELECT count(*), sum(order_id)::int8 FROM {SOURCE_TABLE}").fetchone()
        if tuple(got) != expect:
            sys.exit(f"{SOURCE_TABLE} holds {got}, expected {expect}")

    results = {n: [] for n in names}
    outputs = {n: [] for n in names}
    env = dict(os.environ, RUST_LOG="warn")
    for run in range(a.runs):
        for name in names:
            tag = f"{name}-{run}"
            table = f"bench.t_{name.replace('-', '_')}_{run}"
            out_dir = work / tag
            if name in SINKS:
                conn.execute(ddl(table, key=name == "sluice-upsert"))
            if name == "psql-copy":
                cmd = copy_in(a, table, csv)
            elif name in ("sluice-insert", "sluice-upsert"):
                p = work / f"{tag}.toml"
                p.write_text(sluice_sink_toml(a, table, name.split("-")[1]))
                cmd = [a.sluice, "run", "--bounded", "--no-progress", str(p)]
            elif name.startswith("sluice-pg-to-parquet"):
                p = work / f"{tag}.toml"
                p.write_text(sluice_source_toml(a, out_dir, "auto" if name.endswith("-auto") else "always"))
                cmd = [a.sluice, "run", "--bounded", "--no-progress", str(p)]
            else:
                cmd = [sys.executable, __file__, "python-pg-to-parquet", "--url", a.url, "--table", SOURCE_TABLE,
                       "--out", str(out_dir)]
            # Dirty pages of the previous run are written now, not during this one.
            conn.execute("CHECKPOINT")
            cpu0 = server_cpu()
            r = harness.measure(cmd, str(work / tag), env=env)
            # The run's backends exit after the client does; the postmaster counts their CPU
            # once it has reaped them.
            time.sleep(0.5)
            cpu1 = server_cpu()
            harness.check_rc(r, name)
            r["server_cpu"] = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            if name in SINKS:
                got = tuple(conn.execute(f"SELECT count(*), sum(order_id)::int8 FROM {table}").fetchone())
                conn.execute(f"DROP TABLE {table}")
            else:
                got = parquet_check(out_dir)
                shutil.rmtree(out_dir, ignore_errors=True)
            results[name].append(r)
            outputs[name].append(got)
            srv = "?" if r["server_cpu"] is None else f"{r['server_cpu']:.2f}s"
            print(f"run {run + 1}/{a.runs} {name}: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s server cpu {srv} "
                  f"rss {r['maxrss_kib'] / 1024:.0f}MiB rows {got[0]}", flush=True)
    conn.execute("DROP SCHEMA bench CASCADE")
    conn.close()
    same = all(got == expect for gots in outputs.values() for got in gots)
    md = render(a, results, outputs, expect, same, server, os.path.getsize(csv))
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(md)
    print(md)
    if not a.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    if not same:
        sys.exit(f"outputs differ from the input's (rows, sum(order_id)) = {expect}: {outputs}")


def render(a, results, outputs, expect, same, server, csv_bytes):
    import psycopg

    med, n = harness.med, a.records
    json_bytes = os.path.getsize(a.data)
    L = ["# PostgreSQL benchmarks: order events into and out of a table, sluice vs psql \\copy and Python", ""]
    L.append(harness.machine_md([
        ("records", f"{n:,} order events (NDJSON {json_bytes / n:.0f} bytes each, CSV {csv_bytes / n:.0f} bytes each)"),
        ("PostgreSQL", f"{server['server_version']} on the same machine, over TCP to 127.0.0.1; shared_buffers "
                       f"{server['shared_buffers']}, synchronous_commit {server['synchronous_commit']}, wal_level "
                       f"{server['wal_level']}, max_wal_size {server['max_wal_size']}"),
        ("Python baseline", f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), pyarrow {pa.__version__}"),
    ]))
    L += ["", f"Medians of {a.runs} alternating runs (min–max). CPU is user+sys of the measured process only; "
          "server CPU is what this machine's PostgreSQL processes used during the run (not in records per "
          "CPU-second). MB/s counts the input file: the CSV for psql-copy, the NDJSON for the sluice sinks, and "
          "the NDJSON size of the same records for the sources."]
    stats = {}

    def table(title, group):
        rows = [k for k in group if k in results]
        if not rows:
            return
        L.extend(["", f"## {title}", "",
                  "| run | records | wall s | records/s (wall) | MB/s (wall) | records per CPU-second | "
                  "peak RSS MiB | server CPU s |", "|---|---|---|---|---|---|---|---|"])
        for k in rows:
            rs = results[k]
            wall, cpu = med([r["wall"] for r in rs]), med([r["cpu"] for r in rs])
            rss = med([r["maxrss_kib"] / 1024 for r in rs])
            srv = [r["server_cpu"] for r in rs if r["server_cpu"] is not None]
            size = csv_bytes if k == "psql-copy" else json_bytes
            stats[k] = (n / wall, n / max(cpu, 1e-3), rss)
            L.append(f"| {k} | {n:,} | {harness.med_range([r['wall'] for r in rs], 2)} | {n / wall:,.0f} | "
                     f"{size / 1e6 / wall:,.1f} | {n / max(cpu, 1e-3):,.0f} | {rss:.0f} | "
                     f"{f'{med(srv):.2f}' if srv else '?'} |")

    table("Into PostgreSQL (sinks)", SINKS)
    table("Out of PostgreSQL into Parquet (sources)", SOURCES)
    ratios = []
    base = stats.get("psql-copy")
    for k, target in [("sluice-insert", " (target ≥ 70%)"), ("sluice-upsert", "")]:
        if base and k in stats:
            ratios.append(f"- {k} wall rate / psql \\copy: **{stats[k][0] / base[0]:.0%}**{target}")
    p = stats.get("python-pg-to-parquet")
    for k, how in [("sluice-pg-to-parquet", "default dictionary"), ("sluice-pg-to-parquet-auto", 'dictionary = "auto"')]:
        s = stats.get(k)
        if s and p:
            ratios.append(f"- pg → Parquet, sluice ({how}) / Python: records/s **{s[0] / p[0]:.2f}×**, per CPU-second "
                          f"**{s[1] / p[1]:.2f}×** (target ≥ 2×), peak RSS {s[2]:.0f} vs {p[2]:.0f} MiB")
    if ratios:
        L += ["", "Ratios:", "", *ratios]
    L += ["", f"(rows, sum(order_id)) per run, which must equal the input's {expect}: {outputs} — "
          f"{'equal' if same else 'DIFFERENT'}.", "",
          "Setup: every sink run writes a fresh ordinary (logged) table with the same columns ("
          + ", ".join(f"{c} {PG_TYPES[c]}" for c in NAMES) + "), sluice-upsert's with primary key (order_id); "
          "the sources read one such table with that primary key, loaded once with psql and vacuumed (freeze, "
          "analyze). A CHECKPOINT precedes every run. sluice: `sluice run --bounded --no-progress`, file source "
          "(json, explicit schema) → postgres sink (binary COPY, default batch_rows 200000 / 32MiB per "
          "transaction), and postgres source (binary COPY, shards = 1) → file sink (parquet). Python: psycopg 3 "
          "`COPY (SELECT …) TO STDOUT (FORMAT csv)` parsed by pyarrow.csv in 16 MiB blocks (faster here than "
          "binary COPY through `copy.rows()`; `python-pg-to-parquet --method binary` runs that one). Parquet "
          f"zstd, files of {ROWS_PER_FILE:,} rows on both sides.", "",
          "Reproduce: `benches/postgres.sh` (BENCH_RECORDS, BENCH_RUNS).", ""]
    return "\n".join(L)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("python-pg-to-parquet")
    s.add_argument("--url", required=True)
    s.add_argument("--table", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--method", choices=sorted(METHODS), default="csv")
    s.set_defaults(func=cmd_python)
    c = sub.add_parser("compare")
    c.add_argument("--sluice", required=True)
    c.add_argument("--url", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--records", type=int, required=True)
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--only", default="", help="comma-separated scenarios: " + ", ".join(SINKS + SOURCES))
    c.add_argument("--results", required=True)
    c.add_argument("--keep-work", action="store_true")
    c.set_defaults(func=cmd_compare)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
