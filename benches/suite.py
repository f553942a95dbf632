#!/usr/bin/env python3
"""The benchmark suite (driven by benches/suite.sh): every scenario, sluice against the tools a user
would pick instead, on one dataset, in one run. Writes benches/results/suite.md and suite.png.

Scenarios (`--only` takes a comma-separated list of these names):
  kafka-blackhole    Kafka -> blackhole: sluice vs a bare rdkafka consume loop (the client's limit)
  kafka-parquet      Kafka -> SQL filter/projection -> Parquet files: sluice vs a hand-written
                     Python pipeline (confluent-kafka + pyarrow), Quix Streams and Bytewax
  kafka-s3           the same to Parquet objects on S3 (Garage): sluice vs the Python pipeline with
                     boto3 multipart uploads
  kafka-postgres     Kafka -> PostgreSQL upsert on the primary key: sluice vs Python (confluent-kafka
                     + pyarrow + psycopg COPY into staging + INSERT ON CONFLICT)
  postgres-parquet   a PostgreSQL table -> Parquet files: sluice vs Python (psycopg COPY + pyarrow)
  file-parquet       the NDJSON file -> SQL filter/projection -> Parquet: sluice vs DuckDB (threads=1)
  generator-parquet  sluice's generator -> SQL filter/projection -> Parquet (no baseline: nothing
                     else has this generator; it shows sluice without decoding)
Besides: `latency` (steady-rate Kafka -> file / S3 / PostgreSQL, produce-to-visible percentiles)
and `memory` (peak RSS of generator -> Parquet at 1M and 10M records).

One dataset: N ~250-byte JSON order events (benches/kafka_bench.py gen), produced to the topic,
read as the file and copied into the source table, so every scenario works on the same records.
Every contender's output is checked: rows and sum(order_id) must equal sluice's (and, where known
beforehand, the expected values); a contender whose output differs fails the suite.

Each measured run is one child process under GNU time (harness.measure): wall time around it,
user+sys CPU seconds and peak RSS of that process only. The broker, the S3 server and PostgreSQL
share this machine and are not counted; runs alternate between contenders.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import kafka_bench  # noqa: E402

QUERY = harness.DEFAULT_QUERY
SCHEMA = kafka_bench.SCHEMA
SCENARIOS = ["kafka-blackhole", "kafka-parquet", "kafka-s3", "kafka-postgres", "postgres-parquet",
             "file-parquet", "generator-parquet"]
ROWS_PER_FILE = 1_000_000
PY = sys.executable
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# pipelines


def schema_toml(cols=SCHEMA):
    return "\n".join(f"{c} = {harness.toml_str(t)}" for c, t in cols)


def kafka_source(a, group):
    return (f'[sources.orders]\ntype = "kafka"\nbrokers = "{a.brokers}"\ntopics = ["{a.topic}"]\n'
            f'group_id = "{group}-{time.time_ns()}"\nformat = {{ type = "json" }}\n\n'
            f'[sources.orders.schema]\n{schema_toml()}\n')


def sql_transform():
    return f'[transforms.kept]\ntype = "sql"\ninputs = ["orders"]\nquery = {harness.toml_str(QUERY)}\n'


def file_sink(out, upstream="kept", rotate=f"max_rows = {ROWS_PER_FILE}"):
    return (f'[sinks.out]\ntype = "file"\ninputs = ["{upstream}"]\npath = {harness.toml_str(out)}\n'
            f'format = "parquet"\nrotate = {{ {rotate} }}\n')


def s3_sink(a, prefix, rotate=f"max_rows = {ROWS_PER_FILE}"):
    return (f'[sinks.out]\ntype = "s3"\ninputs = ["kept"]\nbucket = "{a.bucket}"\nprefix = "{prefix}"\n'
            f'endpoint = "{os.environ["SLUICE_TEST_S3_ENDPOINT"]}"\nregion = "{os.environ.get("SLUICE_TEST_S3_REGION", "garage")}"\n'
            'access_key_id = "${SLUICE_TEST_S3_KEY_ID}"\nsecret_access_key = "${SLUICE_TEST_S3_SECRET}"\n'
            f'rotate = {{ {rotate} }}\n')


def pg_sink(a, table, upstream="orders"):
    return (f'[sinks.out]\ntype = "postgres"\ninputs = ["{upstream}"]\nurl = {harness.toml_str(a.pg_url)}\n'
            f'table = "{table}"\nmode = "upsert"\nkey = ["order_id"]\n')


def pipeline(name, *parts):
    return f'[pipeline]\nname = "{name}"\nbatch_size = 8192\n\n' + "\n".join(parts)


# --------------------------------------------------------------------------------------------
# output checks: (rows, sum(order_id))


def parquet_check(d):
    """(rows, sum(order_id)) of the Parquet files under d."""
    import postgres_bench

    return postgres_bench.parquet_check(d)


def s3_check(a, prefix):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    s3 = s3_client()
    n, s = 0, 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=a.bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            if not o["Key"].endswith(".parquet"):
                continue
            body = s3.get_object(Bucket=a.bucket, Key=o["Key"])["Body"].read()
            col = pq.read_table(pa_buffer(body), columns=["order_id"]).column(0)
            n, s = n + len(col), s + (pc.sum(col).as_py() or 0)
    return n, s


def pa_buffer(b):
    import pyarrow as pa

    return pa.BufferReader(b)


def s3_client():
    import s3_bench

    return s3_bench.s3_client()


def psql(a, sql, capture=False):
    """Runs `sql` (one or more statements) on a.pg_url; with `capture`, the rows of the last one as
    psql -At would print them (columns joined by |, one row per line)."""
    import psycopg

    with psycopg.connect(a.pg_url, autocommit=True) as conn:
        cur = conn.execute(sql)
        if capture:
            return "\n".join("|".join(str(v) for v in row) for row in cur.fetchall())
    return None


def pg_table_ddl(table):
    """The records' table with order_id as primary key (postgres_bench's DDL)."""
    import postgres_bench

    return postgres_bench.ddl(table, key=True)


def pg_check(a, table):
    row = psql(a, f"SELECT count(*), coalesce(sum(order_id), 0) FROM {table}", capture=True)
    n, s = row.split("|")
    return int(n), int(s)


def sluice_sink_records(stderr_path):
    """The record count of the `sink` line of sluice's run summary."""
    for line in Path(stderr_path).read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "sink" and parts[3] == "records":
            return int(parts[2])
    return None


# --------------------------------------------------------------------------------------------
# contenders


class Contender:
    """One tool in one scenario. `cmd(run, work)` gives the command; `prepare(run, work)` (not
    timed) runs before it; `check(run, work, r)` returns (rows, sum(order_id)) of what it wrote."""

    def __init__(self, name, label, cmd, check, prepare=None, env=None, baseline=False):
        self.name, self.label, self.cmd, self.check = name, label, cmd, check
        self.prepare, self.env, self.baseline = prepare, env, baseline


def scenario_contenders(a, scenario):
    kafka_env = dict(os.environ, BENCH_BROKERS=a.brokers, BENCH_TOPIC=a.topic, BENCH_COUNT=str(a.records),
                     RUST_LOG="warn")
    base = dict(os.environ, RUST_LOG="warn")

    def sluice_cmd(toml_for):
        def cmd(run, work):
            p = work / f"{scenario}-sluice-{run}.toml"
            p.write_text(toml_for(run, work))
            return [a.sluice, "run", "--bounded", "--no-progress", str(p)]
        return cmd

    def out_dir(tool):
        # Underscores: Quix Streams refuses a directory path with any other punctuation.
        return lambda run, work: work / f"{scenario.replace('-', '_')}_{tool}_{run}"

    if scenario == "kafka-blackhole":
        def bare_check(run, work, r):
            info = json.loads(r["stdout"].read_text().strip().splitlines()[-1])
            return info["messages"], None

        return [
            Contender("sluice", "sluice", sluice_cmd(lambda run, work: pipeline(
                "bench-blackhole", kafka_source(a, "suite-blackhole"),
                '[sinks.out]\ntype = "blackhole"\ninputs = ["orders"]\n')),
                lambda run, work, r: (sluice_sink_records(r["stderr"]), None), env=kafka_env),
            Contender("bare", "bare rdkafka loop (no decoding)", lambda run, work: [a.bare], bare_check,
                      env=kafka_env, baseline=True),
        ]
    if scenario == "kafka-parquet":
        sl, py, qx, bw = out_dir("sluice"), out_dir("python"), out_dir("quix"), out_dir("bytewax")
        return [
            Contender("sluice", "sluice", sluice_cmd(lambda run, work: pipeline(
                "bench-kafka-parquet", kafka_source(a, "suite-parquet"), sql_transform(), file_sink(sl(run, work)))),
                lambda run, work, r: parquet_check(sl(run, work)), env=kafka_env),
            Contender("python", "Python: confluent-kafka + pyarrow", lambda run, work: [
                PY, str(HERE / "kafka_bench.py"), "python", "--brokers", a.brokers, "--topic", a.topic,
                "--count", str(a.records), "--out", str(py(run, work))],
                lambda run, work, r: parquet_check(py(run, work)), env=base, baseline=True),
            Contender("quix", "Quix Streams 3.28 (Parquet file sink)", lambda run, work: [
                PY, str(HERE / "kafka_bench.py"), "quix", "--brokers", a.brokers, "--topic", a.topic,
                "--count", str(a.records), "--out", str(qx(run, work))],
                lambda run, work, r: parquet_check(qx(run, work)), env=base, baseline=True),
            Contender("bytewax", "Bytewax 0.21 (pyarrow decode per batch)", lambda run, work: [
                PY, str(HERE / "kafka_bench.py"), "bytewax", "--brokers", a.brokers, "--topic", a.topic,
                "--count", str(a.records), "--out", str(bw(run, work))],
                lambda run, work, r: parquet_check(bw(run, work)), env=base, baseline=True),
        ]
    if scenario == "kafka-s3":
        def prefix(tool):
            return lambda run: f"suite-{a.stamp}/{tool}-{run}"
        sp, pp = prefix("sluice"), prefix("python")
        return [
            Contender("sluice", "sluice", sluice_cmd(lambda run, work: pipeline(
                "bench-kafka-s3", kafka_source(a, "suite-s3"), sql_transform(), s3_sink(a, sp(run)))),
                lambda run, work, r: s3_check(a, sp(run)), env=kafka_env),
            Contender("python", "Python: confluent-kafka + pyarrow + boto3 multipart", lambda run, work: [
                PY, str(HERE / "kafka_bench.py"), "python", "--brokers", a.brokers, "--topic", a.topic,
                "--count", str(a.records), "--s3", f"{a.bucket}/{pp(run)}"],
                lambda run, work, r: s3_check(a, pp(run)), env=base, baseline=True),
        ]
    if scenario == "kafka-postgres":
        def table(tool):
            return lambda run: f"bench.suite_{tool}_{run}"
        st, pt = table("sluice"), table("python")

        def fresh(t):
            return lambda run, work: psql(a, f"DROP TABLE IF EXISTS {t(run)}; {pg_table_ddl(t(run))}")

        return [
            Contender("sluice", "sluice (upsert)", sluice_cmd(lambda run, work: pipeline(
                "bench-kafka-pg", kafka_source(a, "suite-pg"), pg_sink(a, st(run)))),
                lambda run, work, r: pg_check(a, st(run)), prepare=fresh(st), env=kafka_env),
            Contender("python", "Python: confluent-kafka + pyarrow + psycopg COPY/ON CONFLICT", lambda run, work: [
                PY, str(HERE / "kafka_bench.py"), "python-pg", "--brokers", a.brokers, "--topic", a.topic,
                "--count", str(a.records), "--url", a.pg_url, "--table", pt(run)],
                lambda run, work, r: pg_check(a, pt(run)), prepare=fresh(pt), env=base, baseline=True),
        ]
    if scenario == "postgres-parquet":
        sl, py = out_dir("sluice"), out_dir("python")
        src = (f'[sources.src]\ntype = "postgres"\nurl = {harness.toml_str(a.pg_url)}\n'
               f'table = "{a.source_table}"\nshards = 1\n')
        return [
            Contender("sluice", "sluice", sluice_cmd(lambda run, work: pipeline(
                "bench-pg-parquet", src, file_sink(sl(run, work), upstream="src"))),
                lambda run, work, r: parquet_check(sl(run, work)), env=base),
            Contender("python", "Python: psycopg COPY (csv) + pyarrow", lambda run, work: [
                PY, str(HERE / "postgres_bench.py"), "python-pg-to-parquet", "--url", a.pg_url,
                "--table", a.source_table, "--out", str(py(run, work))],
                lambda run, work, r: parquet_check(py(run, work)), env=base, baseline=True),
        ]
    if scenario == "file-parquet":
        sl, dk = out_dir("sluice"), out_dir("duckdb")
        source = (f'[sources.orders]\ntype = "file"\npath = {harness.toml_str(a.data)}\n'
                  f'format = {{ type = "json" }}\n\n[sources.orders.schema]\n{schema_toml()}\n')
        return [
            Contender("sluice", "sluice", sluice_cmd(lambda run, work: pipeline(
                "bench-file-parquet", source, sql_transform(), file_sink(sl(run, work), rotate="max_bytes = \"4GiB\""))),
                lambda run, work, r: parquet_check(sl(run, work)), env=base),
            Contender("duckdb", "DuckDB (threads=1)", lambda run, work: [
                PY, str(HERE / "harness.py"), "duckdb-job", "--data", str(a.data), "--query", QUERY,
                "--threads", "1", "--with-note", "--out", str(dk(run, work) / "out.parquet")],
                lambda run, work, r: parquet_check(dk(run, work)),
                prepare=lambda run, work: dk(run, work).mkdir(parents=True, exist_ok=True), env=base, baseline=True),
        ]
    if scenario == "generator-parquet":
        sl = out_dir("sluice")
        source = (f'[sources.orders]\ntype = "generator"\nshape = "orders"\ncount = {a.records}\n'
                  f'seed = {harness.SEED}\n')
        return [
            Contender("sluice", "sluice", sluice_cmd(lambda run, work: pipeline(
                "bench-gen-parquet", source, sql_transform(), file_sink(sl(run, work)))),
                lambda run, work, r: parquet_check(sl(run, work)), env=base),
        ]
    raise ValueError(scenario)


def run_scenario(a, scenario, work):
    contenders = scenario_contenders(a, scenario)
    results = {c.name: [] for c in contenders}
    for run in range(a.runs):
        order = contenders if run % 2 == 0 else list(reversed(contenders))
        for c in order:
            if c.prepare:
                c.prepare(run, work)
            r = harness.measure(c.cmd(run, work), str(work / f"{scenario}-{c.name}-{run}"), env=c.env)
            harness.check_rc(r, f"{scenario} / {c.name}")
            r["out"] = c.check(run, work, r)
            results[c.name].append(r)
            print(f"{scenario} run {run + 1}/{a.runs} {c.name}: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s "
                  f"rss {r['maxrss_kib'] / 1024:.0f}MiB output {r['out']}", flush=True)
    return contenders, results


def check_outputs(scenario, results, expect):
    """Every run of every contender must give the same (rows, sum) as sluice's first run, and the
    rows must equal `expect` when it is known. Returns (ok, text)."""
    want = results["sluice"][0]["out"]
    bad = []
    for name, rs in results.items():
        for i, r in enumerate(rs):
            got = r["out"]
            if got[0] != want[0] or (got[1] is not None and want[1] is not None and got[1] != want[1]):
                bad.append(f"{name} run {i + 1}: {got}")
    if expect is not None and want[0] != expect:
        bad.append(f"sluice wrote {want[0]} rows, expected {expect}")
    if bad:
        return False, f"**outputs differ** from sluice's {want}: " + "; ".join(bad)
    s = f", sum(order_id) {want[1]:,}" if want[1] is not None else ""
    return True, f"all runs: {want[0]:,} rows{s}"


# --------------------------------------------------------------------------------------------
# latency: produce at a fixed rate, time from produce to visible in the sink


def ts_string(t):
    ms = int(t * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}"


def latency_producer(a, topic, stop_at, counter):
    """Produces records at a.latency_rate per second until stop_at, each with ts = the time it was
    handed to the client (ms); record i to partition i mod P, one record per batch, linger 0."""
    import random

    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": a.brokers, "linger.ms": 0, "batch.num.messages": 1,
                  "enable.idempotence": False})
    rng = random.Random(7)
    i = 0
    t0 = time.time()
    while True:
        now = time.time()
        if now >= stop_at:
            break
        due = int((now - t0) * a.latency_rate)
        while i < due:
            i += 1
            v = json.loads(kafka_bench.event(i, rng))
            v["ts"] = ts_string(time.time())
            p.produce(topic, json.dumps(v, separators=(",", ":")).encode(), partition=i % a.partitions)
        p.poll(0)
        time.sleep(0.002)
    left = p.flush(60)
    if left:
        # The broker did not keep up: the records waited in the client, and the figures would
        # measure that queue. Lower --latency-rate.
        counter.append(f"{left} records still in the producer's queue after 60 s: the broker cannot take "
                       f"{a.latency_rate} records/s one record per batch (lower BENCH_LATENCY_RATE)")
        return
    counter.append(i)


def latency_run(a, sink, work):
    """One steady-rate run to `sink` (file, s3, postgres): the produced and expected counts and
    (produce time, latency s) of every record seen in the sink."""
    from confluent_kafka.admin import AdminClient, NewTopic
    import pyarrow.parquet as pq

    topic = f"suite-lat-{sink}-{a.stamp}"
    admin = AdminClient({"bootstrap.servers": a.brokers})
    admin.create_topics([NewTopic(topic, num_partitions=a.partitions, replication_factor=1)])[topic].result(30)
    la = argparse.Namespace(**vars(a))
    la.topic = topic
    rotate = f'max_age = "{a.latency_max_age}"'
    out = work / f"latency-{sink}"
    table = f"bench.suite_latency_{a.stamp}"
    prefix = f"suite-{a.stamp}/latency"
    if sink == "file":
        sink_toml = file_sink(out, rotate=rotate)
    elif sink == "s3":
        sink_toml = s3_sink(a, prefix, rotate=rotate)
    else:
        # The columns the SQL keeps, and when each row was inserted.
        psql(a, f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (order_id bigint primary key, "
                "customer_id text, amount numeric(12,2), country text, ts timestamp, "
                "visible_at timestamptz not null default clock_timestamp())")
        sink_toml = pg_sink(a, table, upstream="kept")
    toml = work / f"latency-{sink}.toml"
    toml.write_text(pipeline(f"bench-latency-{sink}", kafka_source(la, "suite-latency"), sql_transform(), sink_toml))
    log = open(work / f"latency-{sink}.log", "wb")
    proc = subprocess.Popen([a.sluice, "run", "--no-progress", str(toml)], stdout=log, stderr=log,
                            env=dict(os.environ, RUST_LOG="warn"))
    time.sleep(3)  # the consumer's assignment; the producer starts after it
    seen = set()  # files / object keys read
    lat = []
    counter = []
    started = time.time()
    stop_at = started + a.latency_seconds
    prod = threading.Thread(target=latency_producer, args=(a, topic, stop_at, counter))
    prod.start()
    s3 = s3_client() if sink == "s3" else None

    def poll():
        now = time.time()
        if sink == "file":
            for f in out.rglob("*.parquet") if out.exists() else []:
                if f in seen:
                    continue
                t = pq.read_table(f, columns=["ts"]).column(0)
                seen.add(f)
                lat.extend((utc(x), now - utc(x)) for x in t.to_pylist())
        elif sink == "s3":
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=a.bucket, Prefix=prefix + "/"):
                for o in page.get("Contents", []):
                    k = o["Key"]
                    if not k.endswith(".parquet") or k in seen:
                        continue
                    body = s3.get_object(Bucket=a.bucket, Key=k)["Body"].read()
                    seen.add(k)
                    t = pq.read_table(pa_buffer(body), columns=["ts"]).column(0)
                    lat.extend((utc(x), now - utc(x)) for x in t.to_pylist())

    kept_total = None
    deadline = None
    while True:
        if proc.poll() is not None:
            sys.exit(f"latency {sink}: sluice exited with {proc.returncode}; log: {log.name}")
        if sink != "postgres":
            poll()
        time.sleep(0.05)
        if not prod.is_alive() and deadline is None:
            deadline = time.time() + 60
        if deadline is not None:
            if sink == "postgres":
                n = int(psql(a, f"SELECT count(*) FROM {table}", capture=True))
            else:
                n = len(lat)
            if isinstance(counter[0], str):
                proc.terminate()
                proc.wait(60)
                sys.exit(f"latency {sink}: {counter[0]}")
            if kept_total is None:
                kept_total = expected_kept(counter[0])
            if n >= kept_total or time.time() > deadline:
                break
    proc.terminate()
    proc.wait(60)
    log.close()
    if sink == "postgres":
        rows = psql(a, f"SELECT extract(epoch from ts at time zone 'UTC'), "
                       f"extract(epoch from visible_at - (ts at time zone 'UTC')) FROM {table}", capture=True)
        lat = [tuple(float(x) for x in line.split("|")) for line in rows.splitlines()]
        psql(a, f"DROP TABLE {table}")
    # The first seconds measure the consumer's start as well; they are left out of the percentiles.
    steady = [x for t, x in lat if t >= started + a.latency_warmup]
    return {"produced": counter[0], "kept": kept_total, "visible": len(lat), "lat": steady}


def utc(x):
    """A naive datetime read from Parquet (UTC wall time) as a Unix time."""
    import datetime

    return x.replace(tzinfo=datetime.timezone.utc).timestamp()


def expected_kept(n):
    """How many of records 1..n of the latency producer pass QUERY (same generator, same seed)."""
    import random

    rng = random.Random(7)
    kept = 0
    for i in range(1, n + 1):
        v = json.loads(kafka_bench.event(i, rng))
        cents = int(v["amount"].replace(".", ""))
        if cents >= 10000 and v["status"] != "cancelled":
            kept += 1
    return kept


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


# --------------------------------------------------------------------------------------------
# memory: generator -> Parquet at several sizes


def memory_runs(a, work):
    out = {}
    for variant in ["plain", "quickstart"]:
        for count in a.memory_counts:
            rs = []
            for run in range(a.memory_runs):
                d = work / f"mem-{variant}-{count}-{run}"
                toml = work / f"mem-{variant}-{count}-{run}.toml"
                text = harness.memory_pipeline_toml(variant, count, d)
                if variant == "quickstart":
                    text = text.replace("${SLUICE_OUT:-out}", str(d))
                toml.write_text(text)
                r = harness.measure([a.sluice, "run", "--no-progress", str(toml)], str(d), env=dict(os.environ, RUST_LOG="warn"))
                harness.check_rc(r, f"memory {variant} {count}")
                rows, _ = parquet_check(d)
                r["rows"] = rows
                rs.append(r)
                subprocess.run(["rm", "-rf", str(d)], check=False)
                print(f"memory {variant} {count:,} run {run + 1}: rss {r['maxrss_kib'] / 1024:.0f}MiB "
                      f"wall {r['wall']:.2f}s rows {rows}", flush=True)
            out[(variant, count)] = rs
    return out


# --------------------------------------------------------------------------------------------
# report


def stats(rs, records):
    med = harness.med
    # GNU time counts CPU in 0.01 s steps: a tiny run (the smoke test's) can report 0.
    wall, cpu = med([r["wall"] for r in rs]), max(med([r["cpu"] for r in rs]), 0.01)
    return {"wall": wall, "cpu": cpu, "rate": records / wall, "per_cpu": records / cpu,
            "rss": med([r["maxrss_kib"] / 1024 for r in rs])}


def render(a, machine, done, latency, memory):
    L = ["# sluice benchmark suite", "", "Written by `benches/suite.sh`; every figure below is from one run of it.", "",
         "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in machine + [
        ("dataset", f"{a.records:,} JSON order events ({a.data_bytes / a.records:.0f} bytes each on average), "
                    f"{a.partitions} Kafka partitions"),
        ("services", f"{a.services} ({a.pg_version})"),
        ("runs", f"{a.runs} per contender, alternating; medians (min–max)")]]
    L += ["", f"SQL where the scenario has it: `{QUERY}`. Parquet is zstd. CPU is user+sys of the "
          "measured process only (the services are not counted).", ""]
    for scenario, (contenders, results, ok, text) in done.items():
        L += [f"## {scenario}", "", "| contender | wall s | records/s | MB/s | records per CPU-second | peak RSS MiB |",
              "|---|---|---|---|---|---|"]
        for c in contenders:
            rs = results[c.name]
            st = stats(rs, a.records)
            L.append(f"| {c.label} | {harness.med_range([r['wall'] for r in rs], 2)} | {st['rate']:,.0f} | "
                     f"{a.data_bytes / st['wall'] / 1e6:,.1f} | {st['per_cpu']:,.0f} | "
                     f"{harness.med_range([r['maxrss_kib'] / 1024 for r in rs])} |")
        L += ["", f"Output check: {text}", ""]
        sl = stats(results["sluice"], a.records)
        for c in contenders:
            if c.baseline:
                b = stats(results[c.name], a.records)
                L.append(f"- sluice / {c.label}: **{sl['rate'] / b['rate']:.2f}×** the wall rate, "
                         f"**{sl['per_cpu'] / b['per_cpu']:.2f}×** the records per CPU-second, "
                         f"{sl['rss'] / b['rss']:.2f}× the peak RSS")
        L.append("")
    L += targets(a, done, memory)
    if latency:
        L += ["## Latency at a steady rate", "",
              f"sluice runs Kafka → SQL → sink (not `--bounded`) while a producer writes "
              f"{a.latency_rate:,} records/s for {a.latency_seconds} s, each with `ts` = the time it was "
              f"produced (the first {a.latency_warmup:g} s are left out of the percentiles). File and S3 sinks rotate on `max_age = \"{a.latency_max_age}\"`; the harness "
              "lists them every 50 ms and a record is visible when its file is; the PostgreSQL sink has its "
              "defaults (flush_interval 1s) and a record is visible at the `clock_timestamp()` default of an "
              "extra column (the time of its insert, just before the commit).", "",
              "| sink | produced | passed the filter | seen | p50 s | p90 s | p99 s | max s |",
              "|---|---|---|---|---|---|---|---|"]
        for sink, r in latency.items():
            x = r["lat"]
            L.append(f"| {sink} | {r['produced']:,} | {r['kept']:,} | {r['visible']:,} | {pct(x, 50):.3f} | "
                     f"{pct(x, 90):.3f} | {pct(x, 99):.3f} | {max(x) if x else float('nan'):.3f} |")
        L.append("")
    if memory:
        L += ["## Peak memory against input size", "",
              "Generator → Parquet with default settings (`plain`: one folder; `quickstart`: "
              "`pipelines/quickstart.toml`, SQL and a folder per day).", "",
              "| pipeline | records | runs | peak RSS MiB | wall s | rows written |", "|---|---|---|---|---|---|"]
        for (variant, count), rs in memory.items():
            L.append(f"| {variant} | {count:,} | {len(rs)} | {harness.med_range([r['maxrss_kib'] / 1024 for r in rs])} | "
                     f"{harness.med_range([r['wall'] for r in rs], 2)} | {rs[0]['rows']:,} |")
        L.append("")
    L += ["![chart](suite.png)", ""]
    return "\n".join(L)


def targets(a, done, memory):
    L = ["## Targets", ""]

    def ratio(scenario, other, field):
        if scenario not in done:
            return None
        res = done[scenario][1]
        return stats(res["sluice"], a.records)[field] / stats(res[other], a.records)[field]

    rows = [("Kafka → Parquet, records per CPU-second vs the Python pipeline", ratio("kafka-parquet", "python", "per_cpu"), 2.5),
            ("Kafka → Parquet, wall rate vs the bare consume loop",
             None if "kafka-parquet" not in done or "kafka-blackhole" not in done else
             stats(done["kafka-parquet"][1]["sluice"], a.records)["rate"]
             / stats(done["kafka-blackhole"][1]["bare"], a.records)["rate"], 0.5),
            ("File → Parquet, records per CPU-second vs DuckDB", ratio("file-parquet", "duckdb", "per_cpu"), 1.0)]
    L += ["| target | measured | wanted | met |", "|---|---|---|---|"]
    for what, got, want in rows:
        if got is not None:
            L.append(f"| {what} | {got:.2f}× | ≥ {want}× | {'yes' if got >= want else 'no'} |")
    if memory:
        for variant in ["plain", "quickstart"]:
            counts = sorted(c for v, c in memory if v == variant)
            if len(counts) >= 2:
                lo = harness.med([r["maxrss_kib"] / 1024 for r in memory[(variant, counts[0])]])
                hi = harness.med([r["maxrss_kib"] / 1024 for r in memory[(variant, counts[-1])]])
                L.append(f"| Peak RSS, {variant}, {counts[-1]:,} vs {counts[0]:,} records | {hi / lo:.2f}× "
                         f"({lo:.0f} → {hi:.0f} MiB) | flat (≈ 1×) | {'yes' if hi / lo <= 1.1 else 'no'} |")
    L.append("")
    return L


def chart(a, done, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = list(done)
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.9 * sum(len(done[s][0]) for s in scen) + 1.5))
    labels, rate, per_cpu, colors = [], [], [], []
    for s in scen:
        contenders, results = done[s][0], done[s][1]
        for c in contenders:
            st = stats(results[c.name], a.records)
            labels.append(f"{s}: {c.name}")
            rate.append(st["rate"])
            per_cpu.append(st["per_cpu"])
            colors.append("#d9534f" if c.name == "sluice" else "#7f8c8d")
    y = list(range(len(labels)))[::-1]
    for ax, vals, title in [(axes[0], rate, "records/s (wall)"), (axes[1], per_cpu, "records per CPU-second")]:
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y)
        ax.set_yticklabels(labels if ax is axes[0] else [""] * len(labels))
        ax.set_title(title)
        ax.set_xscale("log")
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v:,.0f}", va="center", fontsize=7)
    fig.suptitle(f"sluice (red) vs alternatives, {a.records:,} records, {machine_short()}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine_short():
    return f"{os.cpu_count()} cores, {harness.machine_info()[2][1]}"


def ensure_source_table(a, work):
    """The records in a.source_table (schema bench, primary key order_id), loaded once with COPY of
    them as CSV (not timed) and kept while it holds the same rows."""
    import postgres_bench

    exists = psql(a, f"SELECT to_regclass('{a.source_table}') IS NOT NULL", capture=True) == "t"
    csv = work / "source.csv"
    want = postgres_bench.ndjson_to_csv(a.data, csv)
    if exists and pg_check(a, a.source_table) == want:
        return
    psql(a, f"CREATE SCHEMA IF NOT EXISTS bench; DROP TABLE IF EXISTS {a.source_table}; "
            + pg_table_ddl(a.source_table))
    import psycopg

    with psycopg.connect(a.pg_url) as conn, conn.cursor() as cur, open(csv, "rb") as f:
        with cur.copy(f"COPY {a.source_table} FROM STDIN (FORMAT csv)") as cp:
            while block := f.read(1 << 20):
                cp.write(block)
    psql(a, f"VACUUM (FREEZE, ANALYZE) {a.source_table}")
    got = pg_check(a, a.source_table)
    if got != want:
        sys.exit(f"{a.source_table} holds {got}, expected {want}")


# --------------------------------------------------------------------------------------------
# main


def cmd_run(a):
    a.stamp = time.strftime("%Y%m%d%H%M%S")
    a.data = Path(a.data).resolve()
    a.data_bytes = a.data.stat().st_size
    a.memory_counts = [int(c) for c in a.memory_counts.split(",") if c]
    a.pg_version = psql(a, "SHOW server_version", capture=True).split()[0]
    a.pg_version = f"PostgreSQL {a.pg_version}"
    only = [s for s in (a.only.split(",") if a.only else SCENARIOS + ["latency", "memory"])]
    for s in only:
        if s not in SCENARIOS + ["latency", "memory"]:
            sys.exit(f"--only: unknown scenario {s!r} (known: {', '.join(SCENARIOS + ['latency', 'memory'])})")
    work = Path(tempfile.mkdtemp(prefix="sluice_suite_"))
    machine = harness.machine_info()
    psql(a, "CREATE SCHEMA IF NOT EXISTS bench")
    if "postgres-parquet" in only:
        ensure_source_table(a, work)
    expect_rows = {"kafka-blackhole": a.records, "kafka-postgres": a.records, "postgres-parquet": a.records}
    done = {}
    failed = []
    for scenario in [s for s in SCENARIOS if s in only]:
        contenders, results = run_scenario(a, scenario, work)
        ok, text = check_outputs(scenario, results, expect_rows.get(scenario))
        if not ok:
            failed.append(f"{scenario}: {text}")
        done[scenario] = (contenders, results, ok, text)
        subprocess.run(["rm", "-rf", *map(str, work.glob(f"{scenario.replace('-', '_')}_*_[0-9]*"))], check=False)
    latency = {}
    if "latency" in only:
        for sink in ["file", "s3", "postgres"]:
            latency[sink] = latency_run(a, sink, work)
            r = latency[sink]
            print(f"latency {sink}: produced {r['produced']} kept {r['kept']} seen {r['visible']} "
                  f"p50 {pct(r['lat'], 50):.3f}s p99 {pct(r['lat'], 99):.3f}s", flush=True)
            if r["visible"] != r["kept"]:
                failed.append(f"latency {sink}: {r['visible']} records visible, expected {r['kept']}")
    memory = memory_runs(a, work) if "memory" in only else {}
    results_dir = Path(a.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    md = render(a, machine, done, latency, memory)
    (results_dir / "suite.md").write_text(md)
    if done:
        chart(a, done, results_dir / "suite.png")
    print(md)
    if failed:
        sys.exit("suite failed:\n" + "\n".join(failed))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--bare", required=True)
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--records", type=int, required=True)
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--data", required=True, help="the NDJSON file the topic was loaded from")
    ap.add_argument("--pg-url", required=True)
    ap.add_argument("--source-table", required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--services", default="", help="what the services are, for the report")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="")
    # tansu takes about 6,500 records/s sent one record per batch (the load), so the steady run
    # stays well under it.
    ap.add_argument("--latency-rate", type=int, default=1000)
    ap.add_argument("--latency-seconds", type=int, default=30)
    ap.add_argument("--latency-max-age", default="1s")
    ap.add_argument("--latency-warmup", type=float, default=3.0, help="seconds of the run left out of the percentiles")
    ap.add_argument("--memory-counts", default="1000000,10000000")
    ap.add_argument("--memory-runs", type=int, default=2)
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    cmd_run(ap.parse_args())


if __name__ == "__main__":
    main()
