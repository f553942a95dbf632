#!/usr/bin/env python3
"""Soak run (driven by benches/soak.sh): Kafka -> SQL -> Parquet at a steady produce rate for a
long time, sampling the sluice process from its /metrics endpoint: resident memory, open file
descriptors, threads, live Tokio tasks, and consumer lag. At the end the producer stops, the lag
must drain, sluice stops on SIGTERM (exit 0) and the output must hold every produced record once.
Writes a Markdown report with the samples and a verdict per property:

- memory flat: the least-squares slope of RSS over the second half of the run, in MiB per hour,
  and the peak of the second half against the peak of the first;
- no growing lag: the largest lag of the last third is small against one second of input, and the
  lag drains once the producer stops;
- no leak of file descriptors, threads or tasks: their ranges over the second half against the first.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import kafka_bench  # noqa: E402

GAUGES = {
    "rss": "sluice_process_resident_memory_bytes",
    "fds": "sluice_process_open_fds",
    "threads": "sluice_process_threads",
    "tasks": "sluice_runtime_alive_tasks",
}


def scrape(port):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {"lag": 0.0, "consumed": 0.0}
    for line in body.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        for key, gauge in GAUGES.items():
            if name == gauge:
                out[key] = float(value)
        if name == "sluice_kafka_lag_records":
            out["lag"] += float(value)
        if name == "sluice_kafka_consumed_records_total":
            out["consumed"] += float(value)
    return out


class Producer(threading.Thread):
    """Produces `rate` records per second (in 10 slices a second) until stopped."""

    def __init__(self, brokers, topic, partitions, rate):
        super().__init__(daemon=True)
        from confluent_kafka import Producer as P

        # Batches of ~100 ms. soak.sh runs tansu's sqlite engine, which keeps a long run steady
        # (correct end offsets, so sluice's own lag gauge is right too). The memory engine, with
        # the one-record batches its quirks need (kafka_bench.cmd_load), slowed down within
        # minutes at 1,000 records/s: produce requests timed out and fetches went unanswered
        # for 60 s. The sqlite engine with one-record batches took only ~500 records/s.
        self.p = P({"bootstrap.servers": brokers, "linger.ms": 100,
                    "queue.buffering.max.kbytes": 262144, "enable.idempotence": False})
        self.topic, self.partitions, self.rate = topic, partitions, rate
        self.sent = 0
        # Acknowledged by the broker: what the consumer can have read (`sent` counts what was
        # handed to the client, which queues what the broker has not taken yet).
        self.delivered = 0
        self.stop = threading.Event()
        self.behind = 0.0

    def acked(self, err, _msg):
        if err is None:
            self.delivered += 1

    def run(self):
        rng = random.Random(7)
        started = time.time()
        while not self.stop.is_set():
            due = int((time.time() - started) * self.rate)
            self.behind = max(self.behind, (due - self.sent) / self.rate)
            while self.sent < due:
                self.sent += 1
                v = kafka_bench.event(self.sent, rng)
                while True:
                    try:
                        self.p.produce(self.topic, v, partition=self.sent % self.partitions, on_delivery=self.acked)
                        break
                    except BufferError:
                        self.p.poll(0.05)
            self.p.poll(0)
            time.sleep(0.1)
        if self.p.flush(120):
            raise SystemExit("soak: the producer could not deliver everything")


def pipeline(brokers, topic, out, port):
    cols = "\n".join(f'{k} = "{t}"' for k, t in kafka_bench.SCHEMA)
    return (f'[pipeline]\nname = "soak"\nbatch_size = 8192\n\n[sources.orders]\ntype = "kafka"\n'
            f'brokers = "{brokers}"\ntopics = ["{topic}"]\ngroup_id = "soak-{time.time_ns()}"\n'
            f'format = {{ type = "json" }}\n\n[sources.orders.schema]\n{cols}\n\n'
            f'[sinks.out]\ntype = "file"\ninputs = ["orders"]\npath = "{out}"\n'
            f'rotate = {{ max_age = "10s", max_rows = 1000000 }}\n')


def slope_per_hour(points):
    """Least-squares slope of (seconds, value) points, per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 0.0 if var == 0 else sum((t - mx) * (v - my) for t, v in points) / var * 3600


def cmd_run(a):
    import pyarrow.parquet as pq
    from confluent_kafka.admin import AdminClient, NewTopic

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    admin = AdminClient({"bootstrap.servers": a.brokers})
    admin.create_topics([NewTopic(a.topic, num_partitions=a.partitions, replication_factor=1)])[a.topic].result(30)
    spec = out / "soak.toml"
    spec.write_text(pipeline(a.brokers, a.topic, out / "lake", a.metrics_port))
    log = open(out / "sluice.log", "w")
    child = subprocess.Popen([a.sluice, "run", "--no-progress", "--metrics-addr", f"127.0.0.1:{a.metrics_port}",
                              str(spec)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
    producer = Producer(a.brokers, a.topic, a.partitions, a.rate)
    producer.start()
    samples = []
    started = time.time()
    while time.time() - started < a.seconds:
        time.sleep(a.interval)
        if child.poll() is not None:
            raise SystemExit(f"soak: sluice exited early ({child.returncode}); see {out / 'sluice.log'}")
        s = scrape(a.metrics_port)
        s["t"] = time.time() - started
        s["produced"] = producer.sent
        s["delivered"] = producer.delivered
        # Records in the broker not read yet, as the producer sees it; `lag` is sluice's own gauge
        # (the partition's end minus the next offset to read).
        s["behind"] = max(0.0, producer.delivered - s["consumed"])
        samples.append(s)
        print(json.dumps({k: round(v, 1) for k, v in s.items()}), flush=True)
    producer.stop.set()
    producer.join()
    drain_started = time.time()
    while True:
        s = scrape(a.metrics_port)
        if s["consumed"] >= producer.sent:
            break
        if time.time() - drain_started > 120:
            raise SystemExit(f"soak: lag did not drain in 120 s ({s['consumed']} of {producer.sent} consumed)")
        time.sleep(0.5)
    drained = time.time() - drain_started
    child.send_signal(signal.SIGTERM)
    code = child.wait(timeout=120)
    ids = []
    for p in (out / "lake").rglob("*.parquet"):
        ids.extend(pq.read_table(p, columns=["order_id"]).column("order_id").to_pylist())
    distinct = len(set(ids))
    render(a, samples, producer, drained, code, len(ids), distinct, out)
    if code != 0 or distinct != producer.sent:
        raise SystemExit(f"soak: exit {code}, {distinct} distinct of {producer.sent} records")


def render(a, samples, producer, drained, code, rows, distinct, out):
    mib = 1 / (1 << 20)
    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2]
    first = [s for s in samples if s["t"] < samples[-1]["t"] / 2]
    last_third = [s for s in samples if s["t"] >= samples[-1]["t"] * 2 / 3]
    rng = lambda xs, k: (min(s[k] for s in xs), max(s[k] for s in xs))  # noqa: E731
    slope = slope_per_hour([(s["t"], s["rss"] * mib) for s in half])
    lines = [
        "# Soak run: Kafka -> Parquet at a steady rate",
        "",
        f"Generated by `benches/soak.sh`: {a.seconds / 60:.0f} minutes at {a.rate:,} records/s "
        f"(~250-byte JSON orders over {a.partitions} partitions of a local tansu, sqlite engine), "
        f"{a.build}, sampled every "
        f"{a.interval:.0f} s from sluice's `/metrics`. Pipeline: Kafka → Parquet, "
        "`rotate = { max_age = \"10s\" }`, default memory settings.",
        "",
        "| property | first half | second half | verdict |",
        "|---|---|---|---|",
    ]
    r1, r2 = rng(first, "rss"), rng(half, "rss")
    lines.append(f"| RSS (MiB, min–max) | {r1[0] * mib:.0f}–{r1[1] * mib:.0f} | {r2[0] * mib:.0f}–{r2[1] * mib:.0f} | "
                 f"slope over the second half {slope:+.1f} MiB/h |")
    for k, label in [("fds", "open file descriptors"), ("threads", "threads"), ("tasks", "live Tokio tasks")]:
        x1, x2 = rng(first, k), rng(half, k)
        verdict = "no growth" if x2[1] <= x1[1] else f"max grew by {x2[1] - x1[1]:.0f}"
        lines.append(f"| {label} (min–max) | {x1[0]:.0f}–{x1[1]:.0f} | {x2[0]:.0f}–{x2[1]:.0f} | {verdict} |")
    lag1, lag3 = rng(first, "behind"), rng(last_third, "behind")
    lines.append(f"| lag: delivered − consumed (records, min–max) | {lag1[0]:.0f}–{lag1[1]:.0f} | last third: "
                 f"{lag3[0]:.0f}–{lag3[1]:.0f} | drained {drained:.1f} s after the producer stopped |")
    g1, g3 = rng(first, "lag"), rng(last_third, "lag")
    lines.append(f"| sluice_kafka_lag_records (end − next to read, min–max) | {g1[0]:.0f}–{g1[1]:.0f} | last third: "
                 f"{g3[0]:.0f}–{g3[1]:.0f} | sluice's own view of the backlog |")
    lines += [
        "",
        f"Records produced: {producer.sent:,}; rows written: {rows:,}, distinct order ids: {distinct:,}; "
        f"sluice's exit code on SIGTERM: {code}. The producer was at most {producer.behind:.2f} s behind "
        "its schedule.",
        "",
        "## Samples (one a minute)",
        "",
        "| minute | RSS (MiB) | fds | threads | tasks | delivered − consumed | sluice lag | delivered | consumed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    step = max(1, int(60 / a.interval))
    for s in samples[step - 1::step]:
        lines.append(f"| {s['t'] / 60:.0f} | {s['rss'] * mib:.0f} | {s['fds']:.0f} | {s['threads']:.0f} | "
                     f"{s['tasks']:.0f} | {s['behind']:.0f} | {s['lag']:.0f} | {s['delivered']:,} | {s['consumed']:,.0f} |")
    lines += ["", "## Machine", "", harness.machine_md()]
    Path(a.results).write_text("\n".join(lines) + "\n")
    (out / "samples.json").write_text(json.dumps(samples))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--brokers", required=True)
    r.add_argument("--topic", required=True)
    r.add_argument("--partitions", type=int, default=6)
    r.add_argument("--rate", type=int, default=1000)
    r.add_argument("--seconds", type=float, default=1800)
    r.add_argument("--interval", type=float, default=10)
    r.add_argument("--metrics-port", type=int, default=19494)
    r.add_argument("--sluice", required=True)
    r.add_argument("--build", default="release build", help="what --sluice is, for the report")
    r.add_argument("--out", required=True)
    r.add_argument("--results", required=True)
    a = ap.parse_args()
    {"run": cmd_run}[a.cmd](a)


if __name__ == "__main__":
    main()
