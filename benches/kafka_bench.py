#!/usr/bin/env python3
"""Kafka benchmarks (driven by benches/kafka.sh): Kafka -> blackhole and Kafka -> SQL -> Parquet with
sluice, against a bare rdkafka consume loop (the client-side limit) and a hand-written Python
pipeline (confluent-kafka + pyarrow), on one topic, in one run.

Subcommands:
  load      produce N ~250-byte JSON order events over P partitions (confluent-kafka), one record
            per batch (see cmd_load), then one more record per partition
  python    the hand-written baseline: consume, decode with pyarrow, filter, write zstd Parquet
  compare   run everything R times, alternating, and write the Markdown report

Each measured run is one child process under GNU time (user+sys CPU seconds and peak RSS of that
process only: the broker shares the machine and is not counted).
"""

import argparse
import json
import os
import random
import subprocess
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


def cmd_load(a):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": a.brokers})
    admin.create_topics([NewTopic(a.topic, num_partitions=a.partitions, replication_factor=1)])[a.topic].result(30)
    # One record per batch: tansu's memory engine answers a fetch that starts inside a batch with
    # the next batch (the rest of that one is skipped), and a consumer that pauses a partition
    # resumes mid-batch; real Kafka returns the whole batch. This also makes its end offsets right.
    p = Producer({"bootstrap.servers": a.brokers, "linger.ms": 5, "batch.num.messages": 1,
                  "queue.buffering.max.kbytes": 262144, "enable.idempotence": False})
    rng = random.Random(42)
    nbytes = 0
    started = time.time()
    for i in range(1, a.count + 1):
        v = event(i, rng)
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
    # One single-record batch per partition: tansu's memory engine answers ListOffsets(latest) with
    # the last batch's base offset + 1, which is right only when that batch holds one record.
    solo = Producer({"bootstrap.servers": a.brokers, "linger.ms": 0, "enable.idempotence": False})
    for part in range(a.partitions):
        i = a.count + 1 + part
        solo.produce(a.topic, event(i, rng), partition=part)
        solo.flush(30)
    print(json.dumps({"records": a.count + a.partitions, "bytes": nbytes, "seconds": round(time.time() - started, 1)}))


def cmd_python(a):
    """The hand-written pipeline a competent engineer would write: batched consume, one vectorized
    pyarrow JSON decode per batch, pyarrow compute filter, zstd Parquet files of ~1M rows."""
    import io

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj
    import pyarrow.parquet as pq
    from confluent_kafka import Consumer, TopicPartition

    schema = pa.schema([
        ("order_id", pa.int64()), ("customer_id", pa.string()), ("amount", pa.decimal128(12, 2)),
        ("currency", pa.string()), ("country", pa.string()), ("status", pa.string()),
        ("quantity", pa.int32()), ("ts", pa.timestamp("ms")), ("note", pa.string()),
    ])
    out_cols = ["order_id", "customer_id", "amount", "country", "ts"]
    c = Consumer({"bootstrap.servers": a.brokers, "group.id": "bench-python", "enable.auto.commit": False,
                  "fetch.wait.max.ms": 100, "queued.max.messages.kbytes": 65536})
    md = c.list_topics(a.topic, timeout=10)
    c.assign([TopicPartition(a.topic, p, 0) for p in md.topics[a.topic].partitions])
    opts = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    os.makedirs(a.out, exist_ok=True)
    writer, rows_in_file, files, seen, written = None, 0, 0, 0, 0
    threshold = pa.scalar(100, pa.decimal128(12, 2))
    while seen < a.count:
        msgs = c.consume(num_messages=10000, timeout=0.5)
        if not msgs:
            continue
        payloads = [m.value() for m in msgs if m.error() is None]
        seen += len(payloads)
        table = pj.read_json(io.BytesIO(b"\n".join(payloads)), parse_options=opts)
        mask = pc.and_(pc.greater_equal(table["amount"], threshold), pc.not_equal(table["status"], "cancelled"))
        table = table.filter(mask).select(out_cols)
        if writer is None:
            writer = pq.ParquetWriter(os.path.join(a.out, f"part-{files:05d}.parquet"), table.schema,
                                      compression="zstd")
        writer.write_table(table)
        rows_in_file += table.num_rows
        written += table.num_rows
        if rows_in_file >= 1_000_000:
            writer.close()
            writer, rows_in_file, files = None, 0, files + 1
    if writer is not None:
        writer.close()
    c.close()
    print(json.dumps({"seen": seen, "written": written}))


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
                             ("broker", "tansu 0.6.0, memory engine, on the same 2-core machine")]))
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
          "Reproduce: `benches/kafka.sh` (BENCH_RECORDS, BENCH_RUNS, BENCH_PARTITIONS).", ""]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ["load", "python", "compare"]:
        s = sub.add_parser(name)
        s.add_argument("--brokers", required=True)
        s.add_argument("--topic", required=True)
        s.add_argument("--count", type=int, required=True)
        if name in ("load", "compare"):
            s.add_argument("--partitions", type=int, default=12)
        if name == "python":
            s.add_argument("--out", required=True)
        if name == "compare":
            s.add_argument("--runs", type=int, default=3)
            s.add_argument("--sluice", required=True)
            s.add_argument("--bare", required=True)
            s.add_argument("--results", required=True)
    a = ap.parse_args()
    {"load": cmd_load, "python": cmd_python, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
