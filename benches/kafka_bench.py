#!/usr/bin/env python3
"""Kafka benchmarks (driven by benches/kafka.sh): Kafka -> blackhole and Kafka -> SQL -> Parquet with
sluice, against a bare rdkafka consume loop (the client-side limit) and a hand-written Python
pipeline (confluent-kafka + pyarrow), on one topic, in one run.

Subcommands:
  gen        write the N records as an NDJSON file (benches/suite.py loads every service from it)
  load       produce N ~250-byte JSON order events over P partitions (confluent-kafka), one record
             per batch (see cmd_load): those of --data, or generated ones plus one per partition
  python     the hand-written baseline: consume, decode with pyarrow, filter, write zstd Parquet
             (files, or S3 objects with --s3)
  python-pg  the hand-written Kafka -> PostgreSQL upsert (COPY into staging, INSERT ON CONFLICT)
  quix       Kafka -> filter -> Parquet with Quix Streams
  bytewax    Kafka -> filter -> Parquet with Bytewax (pyarrow decode per batch)
  compare    run everything R times, alternating, and write the Markdown report

Each measured run is one child process under GNU time (user+sys CPU seconds and peak RSS of that
process only: the broker shares the machine and is not counted).
"""

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (measure, machine_md, med_range helpers)

QUERY = harness.DEFAULT_QUERY
# The orders of benches/harness.py, padded with a `note` to ~250 bytes per record.
SCHEMA = harness.ORDERS_SLUICE + [("note", "varchar")]
COUNTRIES = ["DE", "FR", "US", "GB", "NL", "ES", "IT", "PL", "SE", "JP", "BR", "IN"]
STATUSES = ["paid", "shipped", "cancelled", "refunded"]


def event(i, rng):
    cents = rng.randrange(100, 50000)
    ts = 1_790_000_000_000 + i * 37
    v = {
        "order_id": i,
        "customer_id": f"C{rng.randrange(1_000_000):07d}",
        "amount": f"{cents // 100}.{cents % 100:02d}",
        "currency": "EUR",
        "country": COUNTRIES[i % len(COUNTRIES)],
        "status": STATUSES[rng.randrange(4)],
        "quantity": rng.randrange(1, 10),
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 1000)) + f".{ts % 1000:03d}",
    }
    s = json.dumps(v, separators=(",", ":"))
    v["note"] = "x" * max(0, 250 - len(s) - 10)
    return json.dumps(v, separators=(",", ":")).encode()


def events(count):
    """The `count` records of the benchmarks, in order (seeded: the same every time)."""
    rng = random.Random(42)
    for i in range(1, count + 1):
        yield event(i, rng)


def cmd_gen(a):
    """Writes the records as an NDJSON file (atomically; kept when it exists)."""
    out = Path(a.out)
    if out.exists():
        print(f"dataset cached: {out}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        for v in events(a.count):
            f.write(v + b"\n")
    tmp.rename(out)
    print(f"dataset written: {out}")


def file_events(path):
    with open(path, "rb") as f:
        for line in f:
            yield line.rstrip(b"\n")


def cmd_load(a):
    """Produces `a.count` records over `a.partitions` partitions (record i to partition i mod P);
    the records of --data, or the generated ones followed by one more record per partition."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": a.brokers})
    admin.create_topics([NewTopic(a.topic, num_partitions=a.partitions, replication_factor=1)])[a.topic].result(30)
    # One record per batch unless --batch-records says otherwise: tansu's memory engine answers a
    # fetch that starts inside a batch with the next batch (the rest of that one is skipped), and
    # a consumer that pauses a partition resumes mid-batch; real Kafka returns the whole batch.
    # With N > 1 the producer lingers long enough for every batch to fill to N records.
    p = Producer({"bootstrap.servers": a.brokers, "linger.ms": 5 if a.batch_records == 1 else 200,
                  "batch.num.messages": a.batch_records,
                  "queue.buffering.max.kbytes": 262144, "enable.idempotence": False})
    nbytes = 0
    started = time.time()
    source = file_events(a.data) if a.data else events(a.count)
    for i, v in enumerate(source, start=1):
        if i > a.count:
            break
        nbytes += len(v)
        while True:
            try:
                p.produce(a.topic, v, partition=i % a.partitions)
                break
            except BufferError:
                p.poll(0.05)
        if i % 10000 == 0:
            p.poll(0)
    if p.flush(300):
        sys.exit("load: messages left undelivered")
    extra = 0
    if not a.data:
        # One single-record batch per partition (kept from when the load batched records: tansu's
        # memory engine answers ListOffsets(latest) with the last batch's base offset + 1).
        rng = random.Random(43)
        solo = Producer({"bootstrap.servers": a.brokers, "linger.ms": 0, "enable.idempotence": False})
        for part in range(a.partitions):
            solo.produce(a.topic, event(a.count + 1 + part, rng), partition=part)
            solo.flush(30)
        extra = a.partitions
    print(json.dumps({"records": a.count + extra, "bytes": nbytes, "seconds": round(time.time() - started, 1)}))


def arrow_schema():
    import pyarrow as pa

    return pa.schema([
        ("order_id", pa.int64()), ("customer_id", pa.string()), ("amount", pa.decimal128(12, 2)),
        ("currency", pa.string()), ("country", pa.string()), ("status", pa.string()),
        ("quantity", pa.int32()), ("ts", pa.timestamp("ms")), ("note", pa.string()),
    ])


def python_consume(a, write, group):
    """The consuming half of the hand-written pipelines a competent engineer would write: one
    consumer assigned every partition from offset 0, batched consume (10,000 messages or 0.5 s),
    one vectorized pyarrow JSON decode per batch; `write(table)` gets each decoded batch until
    `a.count` records were seen. Returns the records seen."""
    import pyarrow.json as pj
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": a.brokers, "group.id": group, "enable.auto.commit": False,
                  "fetch.wait.max.ms": 100, "queued.max.messages.kbytes": 65536})
    md = c.list_topics(a.topic, timeout=10)
    c.assign([TopicPartition(a.topic, p, 0) for p in md.topics[a.topic].partitions])
    opts = pj.ParseOptions(explicit_schema=arrow_schema(), unexpected_field_behavior="ignore")
    seen = 0
    while seen < a.count:
        msgs = c.consume(num_messages=10000, timeout=0.5)
        payloads = [m.value() for m in msgs if m.error() is None]
        if not payloads:
            continue
        seen += len(payloads)
        write(pj.read_json(io.BytesIO(b"\n".join(payloads)), parse_options=opts))
    c.close()
    return seen


def filter_orders(table):
    """QUERY in pyarrow compute: amount >= 100 AND status <> 'cancelled', five columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    threshold = pa.scalar(100, pa.decimal128(12, 2))
    mask = pc.and_(pc.greater_equal(table["amount"], threshold), pc.not_equal(table["status"], "cancelled"))
    return table.filter(mask).select(["order_id", "customer_id", "amount", "country", "ts"])


class RollingFiles:
    """zstd Parquet files of 1,000,000 rows in a directory."""

    def __init__(self, out):
        os.makedirs(out, exist_ok=True)
        self.out, self.writer, self.rows, self.files = out, None, 0, 0

    def write(self, table):
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(os.path.join(self.out, f"part-{self.files:05d}.parquet"), table.schema,
                                           compression="zstd")
        self.writer.write_table(table)
        self.rows += table.num_rows
        if self.rows >= 1_000_000:
            self.close()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer, self.rows, self.files = None, 0, self.files + 1


def cmd_python(a):
    """The hand-written pipeline: python_consume, filter_orders, zstd Parquet files of ~1M rows,
    in a directory (--out) or as objects streamed with boto3 multipart uploads (--s3 BUCKET/PREFIX,
    the writer of benches/s3_bench.py)."""
    if a.s3:
        import s3_bench

        bucket, prefix = a.s3.split("/", 1)
        out = s3_bench.RollingParquet(bucket, prefix)
    else:
        out = RollingFiles(a.out)
    written = 0

    def write(table):
        nonlocal written
        table = filter_orders(table)
        written += table.num_rows
        out.write(table)

    seen = python_consume(a, write, "bench-python")
    out.close()
    print(json.dumps({"seen": seen, "written": written}))


def cmd_python_pg(a):
    """The hand-written Kafka -> PostgreSQL upsert: python_consume; decoded batches gathered up to
    100,000 rows, written as CSV (pyarrow) with COPY into a temporary staging table, then merged
    with INSERT ... ON CONFLICT (order_id) DO UPDATE, one transaction per batch."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import psycopg

    cols = [n for n, _ in SCHEMA]
    conn = psycopg.connect(a.url)
    cur = conn.cursor()
    cur.execute(f"CREATE TEMP TABLE stage (LIKE {a.table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    conn.commit()
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "order_id")
    merge = (f"INSERT INTO {a.table} ({', '.join(cols)}) SELECT DISTINCT ON (order_id) {', '.join(cols)} "
             f"FROM stage ORDER BY order_id ON CONFLICT (order_id) DO UPDATE SET {updates}")
    pending = []
    rows = 0

    def flush():
        nonlocal pending
        if not pending:
            return
        buf = io.BytesIO()
        pcsv.write_csv(pa.concat_tables(pending).select(cols), buf, pcsv.WriteOptions(include_header=False))
        with cur.copy(f"COPY stage ({', '.join(cols)}) FROM STDIN (FORMAT csv)") as cp:
            cp.write(buf.getbuffer())
        cur.execute(merge)
        conn.commit()
        pending = []

    def write(table):
        nonlocal rows
        pending.append(table)
        rows += table.num_rows
        if sum(t.num_rows for t in pending) >= 100_000:
            flush()

    seen = python_consume(a, write, "bench-python-pg")
    flush()
    conn.close()
    print(json.dumps({"seen": seen, "written": rows}))


def cmd_quix(a):
    """The same Kafka -> filter -> Parquet with Quix Streams (PyPI quixstreams): its
    StreamingDataFrame (a Python dict per record), a filter and a projection, and its local
    Parquet file sink (zstd), which writes a file per partition at each checkpoint. Stops once
    `a.count` records were consumed; Quix commits the last checkpoint (and flushes the sink) on
    stop."""
    from decimal import Decimal

    from quixstreams import Application
    from quixstreams.sinks.community.file.formats import ParquetFormat
    from quixstreams.sinks.community.file.local import LocalFileSink

    app = Application(broker_address=a.brokers, consumer_group=f"bench-quix-{time.time_ns()}",
                      auto_offset_reset="earliest", commit_interval=5.0, loglevel="WARNING")
    topic = app.topic(a.topic, value_deserializer="json")
    sdf = app.dataframe(topic)
    seen = 0
    hundred = Decimal(100)

    def count(_value):
        nonlocal seen
        seen += 1
        if seen >= a.count:
            app.stop()

    sdf = sdf.update(count)
    sdf = sdf.filter(lambda v: v["amount"] is not None and Decimal(v["amount"]) >= hundred
                     and v["status"] != "cancelled")
    sdf = sdf[["order_id", "customer_id", "amount", "country", "ts"]]
    sdf.sink(LocalFileSink(directory=a.out, format=ParquetFormat(compression="zstd")))
    app.run()
    print(json.dumps({"seen": seen}))


def cmd_bytewax(a):
    """The same Kafka -> filter -> Parquet with Bytewax (PyPI bytewax), written the vectorized
    way: its KafkaSource (tail=False: it stops at the end of every partition, batches of up to
    10,000 messages), one flat_map_batch step that decodes each batch with pyarrow and filters it
    (filter_orders), and a sink writing zstd Parquet files of ~1M rows. One worker
    (bytewax.testing.run_main), as the other Python pipelines."""
    import bytewax.operators as op
    import pyarrow.json as pj
    from bytewax.connectors.kafka import KafkaSource
    from bytewax.dataflow import Dataflow
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import run_main

    opts = pj.ParseOptions(explicit_schema=arrow_schema(), unexpected_field_behavior="ignore")
    out = RollingFiles(a.out)
    seen = 0

    class Files(StatelessSinkPartition):
        def write_batch(self, items):
            for table in items:
                out.write(table)

        def close(self):
            out.close()

    class Sink(DynamicSink):
        def build(self, step_id, worker_index, worker_count):
            return Files()

    def decode(msgs):
        nonlocal seen
        seen += len(msgs)
        table = filter_orders(pj.read_json(io.BytesIO(b"\n".join(m.value for m in msgs)), parse_options=opts))
        return [table] if table.num_rows else []

    flow = Dataflow("bench-bytewax")
    source = KafkaSource([a.brokers], [a.topic], tail=False, batch_size=10000,
                         add_config={"group.id": f"bench-bytewax-{time.time_ns()}", "fetch.wait.max.ms": "100"})
    op.output("parquet", op.flat_map_batch("decode", op.input("kafka", flow, source), decode), Sink())
    run_main(flow)
    if seen != a.count:
        sys.exit(f"bytewax read {seen} records, expected {a.count}")
    print(json.dumps({"seen": seen}))


def sluice_pipeline(a, kind, out):
    cols = "\n".join(f'{k} = "{t}"' for k, t in SCHEMA)
    sink = ('[sinks.out]\ntype = "blackhole"\ninputs = ["orders"]\n' if kind == "blackhole" else
            f'[transforms.kept]\ntype = "sql"\ninputs = ["orders"]\nquery = "{QUERY}"\n\n'
            f'[sinks.out]\ntype = "file"\ninputs = ["kept"]\npath = "{out}"\nrotate = {{ max_rows = 1000000 }}\n')
    return (f'[pipeline]\nname = "bench-{kind}"\nbatch_size = 8192\n\n[sources.orders]\ntype = "kafka"\n'
            f'brokers = "{a.brokers}"\ntopics = ["{a.topic}"]\ngroup_id = "bench-{kind}-{time.time_ns()}"\n'
            f'format = {{ type = "json" }}\n\n[sources.orders.schema]\n{cols}\n\n{sink}')


def parquet_rows(d):
    import pyarrow.parquet as pq
    return sum(pq.ParquetFile(p).metadata.num_rows for p in Path(d).rglob("*.parquet"))


def cmd_compare(a):
    total = a.count + a.partitions
    work = Path(tempfile.mkdtemp(prefix="sluice-kbench-"))
    results = {k: [] for k in ["bare", "sluice-blackhole", "sluice-parquet", "python-parquet"]}
    outputs = {}
    env = dict(os.environ, BENCH_BROKERS=a.brokers, BENCH_TOPIC=a.topic, BENCH_COUNT=str(total), RUST_LOG="warn")
    for run in range(a.runs):
        for name in results:
            out = work / f"{name}-{run}"
            if name == "bare":
                cmd = [a.bare]
            elif name.startswith("sluice"):
                p = work / f"{name}-{run}.toml"
                p.write_text(sluice_pipeline(a, name.split("-")[1], out))
                cmd = [a.sluice, "run", "--bounded", "--no-progress", str(p)]
            else:
                cmd = [sys.executable, __file__, "python", "--brokers", a.brokers, "--topic", a.topic,
                       "--count", str(total), "--out", str(out)]
            r = harness.measure(cmd, str(work / f"{name}-{run}"), env=env)
            harness.check_rc(r, name)
            if name.endswith("parquet"):
                outputs.setdefault(name, []).append(parquet_rows(out))
            results[name].append(r)
            print(f"run {run + 1}/{a.runs} {name}: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s "
                  f"rss {r['maxrss_kib'] / 1024:.0f}MiB", flush=True)
    same = len(set(outputs["sluice-parquet"] + outputs["python-parquet"])) == 1
    md = render(a, total, results, outputs, same)
    Path(a.results).write_text(md)
    print(md)
    if not same:
        sys.exit(f"outputs differ: {outputs}")


def render(a, total, results, outputs, same):
    med = harness.med
    L = ["# Kafka benchmarks: sluice vs a bare rdkafka loop and a hand-written Python pipeline", ""]
    L.append(harness.machine_md([("records", f"{total:,} (~250-byte JSON, {a.partitions} partitions)"),
                             ("broker", "tansu 0.6.0, memory engine, on the same 2-core machine"),
                             ("producer batches", f"{a.kafka_batch} record(s) each")]))
    L += ["", f"Medians of {a.runs} alternating runs (min–max). CPU is user+sys of the measured process only.", "",
          "| run | wall s | records/s (wall) | MB/s (wall) | records per CPU-second | peak RSS MiB |",
          "|---|---|---|---|---|---|"]
    mb = total * 250 / 1e6
    stats = {}
    for name, rs in results.items():
        wall = med([r["wall"] for r in rs])
        cpu = med([r["cpu"] for r in rs])
        stats[name] = (total / wall, total / cpu)
        L.append(f"| {name} | {harness.med_range([r['wall'] for r in rs], 2)} | {total / wall:,.0f} | "
                 f"{mb / wall:,.1f} | {total / cpu:,.0f} | {med([r['maxrss_kib'] / 1024 for r in rs]):.0f} |")
    bare_wall = stats["bare"][0]
    L += ["", "Ratios (targets from the Kafka issue):", "",
          f"- Kafka → blackhole vs the bare loop, wall rate: **{stats['sluice-blackhole'][0] / bare_wall:.2f}** (target ≥ 0.80)",
          f"- Kafka → SQL → Parquet vs the bare loop, wall rate: **{stats['sluice-parquet'][0] / bare_wall:.2f}** (target ≥ 0.50)",
          f"- Kafka → SQL → Parquet per CPU-second vs the Python pipeline: "
          f"**{stats['sluice-parquet'][1] / stats['python-parquet'][1]:.2f}×** (target ≥ 2.5×)",
          "", f"Rows written (must be equal): {outputs} — {'equal' if same else 'DIFFERENT'}.", "",
          f"Query: `{QUERY}`; Parquet zstd, files of 1,000,000 rows.", "",
          "Reproduce: `benches/kafka.sh` (BENCH_RECORDS, BENCH_RUNS, BENCH_PARTITIONS, BENCH_KAFKA_BATCH).", ""]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--count", type=int, required=True)
    g.add_argument("--out", required=True)
    for name in ["load", "python", "python-pg", "quix", "bytewax", "compare"]:
        s = sub.add_parser(name)
        s.add_argument("--brokers", required=True)
        s.add_argument("--topic", required=True)
        s.add_argument("--count", type=int, required=True)
        if name in ("load", "compare"):
            s.add_argument("--partitions", type=int, default=12)
        if name == "load":
            s.add_argument("--data", default="", help="produce the lines of this NDJSON file (from `gen`)")
            s.add_argument("--batch-records", type=int, default=1,
                           help="records per producer batch (the default 1 is safe with tansu's memory engine)")
        if name in ("python", "quix", "bytewax"):
            s.add_argument("--out", default="")
        if name == "python":
            s.add_argument("--s3", default="", help="BUCKET/PREFIX: write objects instead of --out files")
        if name == "python-pg":
            s.add_argument("--url", required=True)
            s.add_argument("--table", required=True)
        if name == "compare":
            s.add_argument("--runs", type=int, default=3)
            s.add_argument("--sluice", required=True)
            s.add_argument("--bare", required=True)
            s.add_argument("--results", required=True)
            s.add_argument("--kafka-batch", type=int, default=1, help="records per producer batch in the topic (for the table)")
    a = ap.parse_args()
    {"gen": cmd_gen, "load": cmd_load, "python": cmd_python, "python-pg": cmd_python_pg, "quix": cmd_quix, "bytewax": cmd_bytewax,
     "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
