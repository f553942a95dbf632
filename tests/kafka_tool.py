#!/usr/bin/env python3
"""The independent Kafka client of the integration tests (confluent-kafka, not sluice's rdkafka).

  kafka_tool.py create   --brokers B --topic T --partitions N
  kafka_tool.py produce  --brokers B --topic T --partitions N --count C [--bad-every K] [--manifest F]
  kafka_tool.py read     --brokers B --topic T --expect N # one JSON line per message
  kafka_tool.py offsets  --brokers B --topic T --group G  # {"partition": [committed, end], ...}

`produce` writes order events {"order_id", "customer", "amount", "status"} with key
"order-<id>" and a header "source: test", record i to partition i % N. With --bad-every K every
K-th record is bad, alternating broken JSON and a wrong-typed amount. --manifest writes what was
produced: {"good": {id: amount_cents}, "bad": [ids], "count": C}.

`--format avro` writes the same orders as Avro binary bodies (fastavro, schema ORDER_V1, amount a
decimal(12,2)); `--format confluent` in the Confluent wire format (magic 0, 4-byte big-endian
schema id, body), every third record with the evolved writer schema ORDER_V2 (id 2, an extra
field) and the rest with ORDER_V1 (id 1). Bad Avro records alternate a truncated body and, for
`confluent`, a schema id (99) no registry has or a wrong magic byte. --schemas-out writes
{"reader": ORDER_V1, "ids": {"1": ..., "2": ...}} for the test's reader schema file and registry.

KAFKA_TOOL_CONFIG (JSON) adds client settings to every client, e.g. TLS and SASL.
"""

import argparse
import decimal
import io
import json
import os
import struct
import sys
import time

import fastavro

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

STATUSES = ["paid", "shipped", "cancelled", "refunded"]


def conf(brokers, **extra):
    c = {"bootstrap.servers": brokers}
    # Security settings (TLS, SASL) come through the environment, so that no password is on a
    # command line: KAFKA_TOOL_CONFIG='{"security.protocol": "SASL_SSL", ...}'.
    c.update(json.loads(os.environ.get("KAFKA_TOOL_CONFIG", "{}")))
    c.update(extra)
    return c


def create(a):
    admin = AdminClient(conf(a.brokers))
    fs = admin.create_topics([NewTopic(a.topic, num_partitions=a.partitions, replication_factor=1)])
    for _, f in fs.items():
        try:
            f.result(30)
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise
    # Wait until the metadata shows every partition.
    for _ in range(100):
        md = admin.list_topics(a.topic, timeout=10)
        t = md.topics.get(a.topic)
        if t is not None and t.error is None and len(t.partitions) == a.partitions:
            return
        time.sleep(0.1)
    sys.exit(f"topic {a.topic} did not appear with {a.partitions} partitions")


ORDER_V1 = {
    "type": "record", "name": "Order", "namespace": "sluice.test",
    "fields": [
        {"name": "order_id", "type": "long"},
        {"name": "customer", "type": "string"},
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
        {"name": "status", "type": ["null", "string"], "default": None},
    ],
}
ORDER_V2 = dict(ORDER_V1, fields=ORDER_V1["fields"] + [{"name": "coupon", "type": "string", "default": ""}])
PARSED = {1: fastavro.parse_schema(ORDER_V1), 2: fastavro.parse_schema(ORDER_V2)}


def avro_record(i, bad_every, framing):
    """(value bytes, good amount in cents or None), Avro-encoded."""
    cents = (i * 7919) % 100000 + 1
    schema_id = 2 if framing == "confluent" and i % 3 == 0 else 1
    value = {"order_id": i, "customer": "Zoë ünïcode" if i % 11 == 0 else f"c{i % 97}",
             "amount": decimal.Decimal(cents).scaleb(-2), "status": STATUSES[i % len(STATUSES)],
             "coupon": f"SAVE{i % 5}"}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, PARSED[schema_id], value)
    body = buf.getvalue()
    header = b"\x00" + struct.pack(">I", schema_id) if framing == "confluent" else b""
    if bad_every and i % bad_every == 0:
        kind = (i // bad_every) % 3 if framing == "confluent" else 0
        if kind == 0:
            return header + body[:3], None
        if kind == 1:
            return b"\x00" + struct.pack(">I", 99) + body, None
        return b"\x07" + header[1:] + body, None
    return header + body, cents


def record(i, bad_every, fmt="json"):
    if fmt != "json":
        return avro_record(i, bad_every, fmt)
    """(value bytes, good amount in cents or None)."""
    cents = (i * 7919) % 100000 + 1
    status = STATUSES[i % len(STATUSES)]
    if bad_every and i % bad_every == 0:
        if (i // bad_every) % 2 == 0:
            return f'{{"order_id": {i}, "customer": "c{i % 97}", "amount": '.encode(), None
        return json.dumps({"order_id": i, "customer": f"c{i % 97}", "amount": "abc", "status": status}).encode(), None
    value = {"order_id": i, "customer": f"c{i % 97}", "amount": f"{cents // 100}.{cents % 100:02d}", "status": status}
    if i % 11 == 0:
        value["customer"] = "Zoë ünïcode"
    return json.dumps(value, ensure_ascii=False).encode(), cents


def produce(a):
    # One record per batch: tansu's memory engine answers a fetch from an offset inside a batch
    # with the next batch, skipping the rest of that one (seen here: fetch 15003 -> first record
    # 15009). Consumers resume mid-batch after a commit or a pause, so the tests keep every batch
    # at one record. Real Kafka returns the containing batch.
    p = Producer(conf(a.brokers, **{"linger.ms": 5, "batch.num.messages": 1, "enable.idempotence": False}))
    failures = []

    def on_delivery(err, msg):
        if err is not None:
            failures.append(str(err))

    # The last record of each partition goes alone in its own batch: tansu's memory engine answers
    # ListOffsets(latest) with the last batch's base offset + 1 (../shared/TEST-SERVICES.md), which is
    # the true end only when that batch holds one record.
    solo = Producer(conf(a.brokers, **{"linger.ms": 0, "enable.idempotence": False}))
    last = a.start + a.count - 1
    good, bad = {}, []
    for i in range(a.start, a.start + a.count):
        value, cents = record(i, a.bad_every, a.format)
        if cents is None:
            bad.append(i)
        else:
            good[str(i)] = cents
        if last - i < a.partitions:
            if p.flush(120):
                sys.exit("produce: messages left undelivered")
            solo.produce(a.topic, value=value, key=f"order-{i}".encode(), partition=i % a.partitions,
                         headers=[("source", b"test")], on_delivery=on_delivery)
            if solo.flush(30):
                sys.exit("produce: a final message was not delivered")
            continue
        while True:
            try:
                p.produce(a.topic, value=value, key=f"order-{i}".encode(), partition=i % a.partitions,
                          headers=[("source", b"test")], on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    left = p.flush(120)
    if left or failures:
        sys.exit(f"produce failed: {left} undelivered, errors: {failures[:3]}")
    if a.manifest:
        with open(a.manifest, "w") as f:
            json.dump({"good": good, "bad": bad, "count": a.count}, f)
    if a.schemas_out:
        with open(a.schemas_out, "w") as f:
            json.dump({"reader": json.dumps(ORDER_V1),
                       "ids": {"1": json.dumps(ORDER_V1), "2": json.dumps(ORDER_V2)}}, f)
    print(json.dumps({"produced": a.count, "bad": len(bad)}))


def partitions_of(admin_conf, topic):
    md = AdminClient(admin_conf).list_topics(topic, timeout=10)
    return sorted(md.topics[topic].partitions)


def read(a):
    """Reads until --expect messages were seen and nothing more arrives for 2 s (end offsets are
    not trusted: see produce)."""
    c = Consumer(conf(a.brokers, **{"group.id": "kafka-tool-reader", "enable.auto.commit": False,
                                    "fetch.wait.max.ms": 10}))
    parts = partitions_of(conf(a.brokers), a.topic)
    c.assign([TopicPartition(a.topic, p, 0) for p in parts])
    deadline = time.time() + a.timeout
    seen, quiet_since = 0, time.time()
    while time.time() < deadline:
        m = c.poll(0.2)
        if m is None:
            if seen >= a.expect and time.time() - quiet_since > 2:
                break
            continue
        quiet_since = time.time()
        if m.error():
            sys.exit(f"consume error: {m.error()}")
        seen += 1
        headers = {k: (v.decode() if v is not None else None) for k, v in (m.headers() or [])}
        print(json.dumps({"partition": m.partition(), "offset": m.offset(),
                          "key": m.key().decode() if m.key() is not None else None,
                          "value": m.value().decode(errors="replace") if m.value() is not None else None,
                          "headers": headers}))
    c.close()
    if seen < a.expect:
        sys.exit(f"timed out: read {seen} of {a.expect} messages")


def offsets(a):
    c = Consumer(conf(a.brokers, **{"group.id": a.group, "enable.auto.commit": False}))
    parts = partitions_of(conf(a.brokers), a.topic)
    committed = c.committed([TopicPartition(a.topic, p) for p in parts], timeout=10)
    out = {}
    for tp in committed:
        _, hi = c.get_watermark_offsets(TopicPartition(a.topic, tp.partition), timeout=10)
        out[str(tp.partition)] = [tp.offset, hi]
    c.close()
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ["create", "produce", "read", "offsets"]:
        s = sub.add_parser(name)
        s.add_argument("--brokers", required=True)
        s.add_argument("--topic", required=True)
        if name in ("create", "produce"):
            s.add_argument("--partitions", type=int, required=True)
        if name == "produce":
            s.add_argument("--count", type=int, required=True)
            s.add_argument("--start", type=int, default=1)
            s.add_argument("--bad-every", type=int, default=0)
            s.add_argument("--manifest")
            s.add_argument("--format", choices=["json", "avro", "confluent"], default="json")
            s.add_argument("--schemas-out")
        if name == "read":
            s.add_argument("--timeout", type=float, default=120)
            s.add_argument("--expect", type=int, required=True)
        if name == "offsets":
            s.add_argument("--group", required=True)
    a = ap.parse_args()
    {"create": create, "produce": produce, "read": read, "offsets": offsets}[a.cmd](a)


if __name__ == "__main__":
    main()
