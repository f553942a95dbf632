#!/usr/bin/env python3
"""Object-storage benchmarks (driven by benches/s3.sh): JSON order events -> Parquet (zstd) on an
S3-compatible server, with sluice and with a hand-written Python pipeline (pyarrow decode and
Parquet encode, boto3 multipart upload), on the same records and the same server, in one run.

Scenarios:
  generator -> S3     sluice's generator (no decode); reported, no baseline
  NDJSON file -> S3   sluice file source vs Python (pyarrow.json streaming reader)
  Kafka -> S3         sluice Kafka source vs Python (confluent-kafka batches + pyarrow.json)

Subcommands:
  python-file   the Python baseline reading an NDJSON file
  python-kafka  the Python baseline reading a Kafka topic
  compare       run everything R times, alternating, check outputs, write the Markdown report

Each measured run is one child process under GNU time (user+sys CPU seconds and peak RSS of that
process only: the S3 server and the broker share the machine and are not counted).
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

PART_SIZE = 8 << 20
ROWS_PER_FILE = 1_000_000


def s3_client():
    """The tests' boto3 client (tests/s3_tool.py), from the SLUICE_TEST_S3_* variables."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import s3_tool

    return s3_tool.client()


class MultipartFile(io.RawIOBase):
    """A write-only file that streams to an S3 multipart upload in PART_SIZE parts (a single
    PutObject when the whole file is smaller than one part)."""

    def __init__(self, s3, bucket, key):
        self.s3, self.bucket, self.key = s3, bucket, key
        self.buf = bytearray()
        self.parts = []
        self.upload_id = None
        self.pos = 0

    def writable(self):
        return True

    def tell(self):
        return self.pos

    def write(self, b):
        self.buf += b
        self.pos += len(b)
        if len(self.buf) >= PART_SIZE:
            self._part()
        return len(b)

    def _part(self):
        if self.upload_id is None:
            self.upload_id = self.s3.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        n = len(self.parts) + 1
        r = self.s3.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n,
                                Body=bytes(self.buf))
        self.parts.append({"ETag": r["ETag"], "PartNumber": n})
        self.buf = bytearray()

    def close(self):
        if self.closed:
            return
        if self.upload_id is None:
            self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buf))
        else:
            if self.buf:
                self._part()
            self.s3.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                              MultipartUpload={"Parts": self.parts})
        super().close()


def arrow_schema():
    import pyarrow as pa

    return pa.schema([
        ("order_id", pa.int64()), ("customer_id", pa.string()), ("amount", pa.decimal128(12, 2)),
        ("currency", pa.string()), ("country", pa.string()), ("status", pa.string()),
        ("quantity", pa.int32()), ("ts", pa.timestamp("us")), ("note", pa.string()),
    ])


class RollingParquet:
    """zstd Parquet objects of ROWS_PER_FILE rows under a prefix."""

    def __init__(self, bucket, prefix):
        self.s3, self.bucket, self.prefix = s3_client(), bucket, prefix
        self.writer, self.sink, self.rows, self.files = None, None, 0, 0

    def write(self, table):
        import pyarrow.parquet as pq

        while table.num_rows:
            if self.writer is None:
                self.sink = MultipartFile(self.s3, self.bucket, f"{self.prefix}/part-{self.files:05d}.parquet")
                self.writer = pq.ParquetWriter(self.sink, table.schema, compression="zstd")
            take = min(table.num_rows, ROWS_PER_FILE - self.rows)
            self.writer.write_table(table.slice(0, take))
            self.rows += take
            table = table.slice(take)
            if self.rows >= ROWS_PER_FILE:
                self.close()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer, self.rows, self.files = None, 0, self.files + 1


def cmd_python_file(a):
    import pyarrow.json as pj

    schema = arrow_schema()
    out = RollingParquet(a.bucket, a.prefix)
    opts = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    reader = pj.open_json(a.data, read_options=pj.ReadOptions(block_size=8 << 20), parse_options=opts)
    n = 0
    for batch in reader:
        import pyarrow as pa

        out.write(pa.Table.from_batches([batch]))
        n += batch.num_rows
    out.close()
    print(json.dumps({"rows": n}))


def cmd_python_kafka(a):
    import pyarrow.json as pj
    from confluent_kafka import Consumer, TopicPartition

    schema = arrow_schema()
    out = RollingParquet(a.bucket, a.prefix)
    opts = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    c = Consumer({"bootstrap.servers": a.brokers, "group.id": "bench-python-s3", "enable.auto.commit": False,
                  "fetch.wait.max.ms": 100, "queued.max.messages.kbytes": 65536})
    md = c.list_topics(a.topic, timeout=10)
    c.assign([TopicPartition(a.topic, p, 0) for p in md.topics[a.topic].partitions])
    seen = 0
    while seen < a.count:
        msgs = c.consume(num_messages=10000, timeout=0.5)
        payloads = [m.value() for m in msgs if m.error() is None]
        if not payloads:
            continue
        seen += len(payloads)
        out.write(pj.read_json(io.BytesIO(b"\n".join(payloads)), parse_options=opts))
    out.close()
    c.close()
    print(json.dumps({"rows": seen}))


def sluice_toml(a, kind, prefix):
    cols = "\n".join(f'{k} = "{t}"' for k, t in harness.ORDERS_SLUICE + [("note", "varchar")])
    if kind == "generator":
        source = f'type = "generator"\nshape = "orders"\ncount = {a.records}\nseed = {harness.SEED}\n'
    elif kind == "file":
        source = f'type = "file"\npath = {harness.toml_str(a.data)}\nformat = {{ type = "json" }}\n'
    else:
        source = (f'type = "kafka"\nbrokers = "{a.brokers}"\ntopics = ["{a.topic}"]\n'
                  f'group_id = "bench-s3-{time.time_ns()}"\nformat = {{ type = "json" }}\n')
    schema = "" if kind == "generator" else f"\n[sources.orders.schema]\n{cols}\n"
    return f"""[pipeline]
name = "bench-s3-{kind}"
batch_size = 8192

[sources.orders]
{source}{schema}
[sinks.lake]
type = "s3"
inputs = ["orders"]
bucket = "{a.bucket}"
prefix = "{prefix}"
endpoint = "{os.environ['SLUICE_TEST_S3_ENDPOINT']}"
region = "garage"
access_key_id = "${{SLUICE_TEST_S3_KEY_ID}}"
secret_access_key = "${{SLUICE_TEST_S3_SECRET}}"
rotate = {{ max_rows = {ROWS_PER_FILE} }}
"""


def rows_under(s3, bucket, prefix):
    import pyarrow.parquet as pq

    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            n += pq.ParquetFile(io.BytesIO(body)).metadata.num_rows
    return n


def cmd_compare(a):
    work = Path(tempfile.mkdtemp(prefix="sluice-s3bench-"))
    s3 = s3_client()
    names = ["sluice-generator", "sluice-file", "python-file"]
    if a.brokers:
        names += ["sluice-kafka", "python-kafka"]
    results = {k: [] for k in names}
    outputs = {}
    env = dict(os.environ, RUST_LOG="warn")
    for run in range(a.runs):
        for name in names:
            prefix = f"{name}-{run}"
            tool, kind = name.split("-")
            if tool == "sluice":
                p = work / f"{prefix}.toml"
                p.write_text(sluice_toml(a, kind, prefix))
                cmd = [a.sluice, "run", "--bounded", "--no-progress", str(p)]
            else:
                cmd = [sys.executable, __file__, f"python-{kind}", "--bucket", a.bucket, "--prefix", prefix,
                       "--data", a.data, "--brokers", a.brokers or "", "--topic", a.topic or "",
                       "--count", str(a.kafka_records)]
            r = harness.measure(cmd, str(work / prefix), env=env)
            harness.check_rc(r, name)
            results[name].append(r)
            outputs.setdefault(kind, {}).setdefault(name, []).append(rows_under(s3, a.bucket, prefix))
            print(f"run {run + 1}/{a.runs} {name}: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s "
                  f"rss {r['maxrss_kib'] / 1024:.0f}MiB", flush=True)
    same = all(len({n for ns in by.values() for n in ns}) == 1 for by in outputs.values())
    md = render(a, results, outputs, same)
    Path(a.results).write_text(md)
    print(md)
    if not same:
        sys.exit(f"outputs differ: {outputs}")


def render(a, results, outputs, same):
    med = harness.med
    L = ["# Object-storage benchmarks: JSON orders -> Parquet on S3, sluice vs Python (pyarrow + boto3)", ""]
    L.append(harness.machine_md([
        ("records", f"{a.records:,} from the file and the generator (as NDJSON, "
                    f"{os.path.getsize(a.data) / a.records:.0f} bytes each); {a.kafka_records:,} from Kafka "
                    f"(~250-byte JSON, {a.partitions if hasattr(a, 'partitions') else 12} partitions, "
                    f"{a.kafka_batch} record{'s' if a.kafka_batch > 1 else ''} per producer batch)"),
        ("S3 server", "Garage 2.5.0 on the same 2-core machine (sqlite metadata)"),
    ]))
    L += ["", f"Medians of {a.runs} alternating runs (min–max). CPU is user+sys of the measured process "
          "only; the S3 server and the broker are not counted. MB/s counts the JSON input.", "",
          "| run | records | wall s | records/s (wall) | MB/s (wall) | records per CPU-second | peak RSS MiB |",
          "|---|---|---|---|---|---|---|"]
    stats = {}
    file_bytes = os.path.getsize(a.data) / a.records
    for name, rs in results.items():
        n = a.kafka_records if name.endswith("kafka") else a.records
        per_record = 250 if name.endswith("kafka") else file_bytes
        wall = med([r["wall"] for r in rs])
        cpu = med([r["cpu"] for r in rs])
        rss = med([r["maxrss_kib"] / 1024 for r in rs])
        stats[name] = (n / wall, n / cpu, rss)
        L.append(f"| {name} | {n:,} | {harness.med_range([r['wall'] for r in rs], 2)} | {n / wall:,.0f} | "
                 f"{n * per_record / 1e6 / wall:,.1f} | {n / cpu:,.0f} | {rss:.0f} |")
    L += ["", "Ratios, sluice / Python (target: ≥ 3× records per CPU-second at equal or lower peak memory):", ""]
    for kind in ["file", "kafka"]:
        s, p = stats.get(f"sluice-{kind}"), stats.get(f"python-{kind}")
        if s and p:
            L.append(f"- {kind} → S3: per CPU-second **{s[1] / p[1]:.2f}×**, wall rate {s[0] / p[0]:.2f}×, "
                     f"peak RSS {s[2]:.0f} vs {p[2]:.0f} MiB")
    L += ["", f"Rows in the bucket per run (must be equal per scenario): {outputs} — "
          f"{'equal' if same else 'DIFFERENT'}.", "",
          f"Parquet zstd, objects of {ROWS_PER_FILE:,} rows, 8 MiB multipart parts on both sides.", "",
          "Reproduce: `benches/s3.sh` (BENCH_RECORDS, BENCH_KAFKA_RECORDS, BENCH_KAFKA_BATCH, BENCH_RUNS).", ""]
    return "\n".join(L)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, func in [("python-file", cmd_python_file), ("python-kafka", cmd_python_kafka)]:
        s = sub.add_parser(name)
        s.add_argument("--bucket", required=True)
        s.add_argument("--prefix", required=True)
        s.add_argument("--data", default="")
        s.add_argument("--brokers", default="")
        s.add_argument("--topic", default="")
        s.add_argument("--count", type=int, default=0)
        s.set_defaults(func=func)
    c = sub.add_parser("compare")
    c.add_argument("--sluice", required=True)
    c.add_argument("--bucket", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--records", type=int, required=True)
    c.add_argument("--brokers", default="")
    c.add_argument("--topic", default="")
    c.add_argument("--kafka-records", type=int, default=0)
    c.add_argument("--kafka-batch", type=int, default=1, help="records per producer batch in the topic (for the table)")
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--results", required=True)
    c.set_defaults(func=cmd_compare)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
