#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (run once; the fuzzers
add what they find). Needs fastavro (the test virtualenv has it):

  ~/.cache/sluice/venv/bin/python fuzz/make_seeds.py
"""

import io
import json
import struct
from pathlib import Path

import fastavro

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
ROOT = HERE.parent

# The schemas of src/fuzzing.rs.
ORDER_V1 = {"type": "record", "name": "Order", "fields": [
    {"name": "order_id", "type": "long"},
    {"name": "customer", "type": ["null", "string"], "default": None},
    {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
    {"name": "tags", "type": {"type": "array", "items": "string"}},
    {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["paid", "shipped", "cancelled"]}},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}}]}
ORDER_V2 = dict(ORDER_V1, fields=ORDER_V1["fields"] + [{"name": "note", "type": "string", "default": ""}])


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def json_seeds():
    good = {"order_id": 1, "amount": "12.50", "ts": "2026-01-02T03:04:05", "country": "DE", "tags": ["a", "b"],
            "paid": True, "ratio": 0.5, "day": "2026-01-02"}
    write("json", "good", json.dumps(good) + "\n" + json.dumps(dict(good, order_id=2, amount=3)))
    write("json", "messy", "\n".join([
        '{"order_id": 3, "amount": "abc"}', '{"order_id": null}', '{"order_id": 4, "extra": {"deep": [1, 2]}}',
        '{"order_id": 5', '[1,2]', '{"order_id": 6}{"order_id": 7}', '', '{"order_id": 8, "country": "Zoë 東京"}',
        '{"order_id": 9, "amount": "99999999999999999999999.99"}', '{"order_id": 10, "ts": "yesterday"}',
        '{"order_id": 11, "tags": "not-a-list"}', '{"order_id": 12, "paid": "yes"}']))
    write("json", "nested", '{"order_id": 1, "x": ' + "[" * 200 + "]" * 200 + "}")
    write("json", "invalid-utf8", b'{"order_id": 1, "country": "\xff\xfe"}\n{"order_id": 2}')


def csv_seeds():
    write("csv", "good", "1,12.50,2026-01-02T03:04:05,DE,,true,0.5,2026-01-02\n2,3,,FR,,false,,\n")
    write("csv", "messy", '3,abc\n,1\n4,"quoted\nacross lines",x\n5,"unterminated\n6,1,2,3,4,5,6,7,8,9\n'
                          '7,1e400\n"8",,,"Zoë",,,,\n')


def avro_body(schema, record):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return out.getvalue()


def framed(records):
    return b"".join(bytes([min(len(r), 255)]) + r[:255] for r in records)


def avro_seeds():
    import decimal
    r = {"order_id": 7, "customer": "Zoë", "amount": decimal.Decimal("12.34"), "tags": ["x", "y"],
         "status": "shipped", "ts": 1_790_000_000_000_000}
    v1 = avro_body(ORDER_V1, r)
    v1b = avro_body(ORDER_V1, dict(r, order_id=8, customer=None, tags=[]))
    v2 = avro_body(ORDER_V2, dict(r, order_id=9, note="evolved"))
    write("avro", "good", framed([v1, v1b]))
    write("avro", "messy", framed([v1[:5], v1 + b"\x00", b"", b"\xff" * 20, v1b]))
    conf = lambda sid, body: b"\x00" + struct.pack(">I", sid) + body  # noqa: E731
    write("confluent", "good", framed([conf(1, v1), conf(2, v2), conf(1, v1b)]))
    write("confluent", "messy", framed([conf(99, v1), b"\x01" + v1, b"\x00\x00", conf(2, v1), conf(1, v1[:-3]),
                                        conf(2, v2) + b"\x00"]))


def toml_seeds():
    for p in sorted((ROOT / "pipelines").glob("*.toml")):
        write("pipeline_toml", p.stem, p.read_text())
    write("pipeline_toml", "broken", '[pipeline]\nname = "x"\n[sources.a]\ntype = "generator"\nshape = "orders"\n'
                                     '[sinks.b]\ntype = "file"\ninputs = ["a", "b"]\npath = "${MISSING}"\nbogus = 1\n')


def coordinator_seeds():
    shard = {"source": "orders", "id": "t/0", "kind": {"type": "partition", "topic": "t", "partition": 0}}
    grant = {"shard": shard, "epoch": 1}
    lines = [
        "H" + json.dumps({"worker_id": "a", "name": "a", "applied_version": 0, "held": [], "finished": [],
                          "shards": [], "rate": 0}),
        "H" + json.dumps({"worker_id": "b", "name": "b", "applied_version": 0, "held": [grant], "rate": 1e9,
                          "leaving": False}),
        "H" + json.dumps({"worker_id": "a", "name": "a", "applied_version": 99, "held": [grant], "leaving": True}),
        "L" + json.dumps({"worker_id": "b"}),
        "H{not json", "L{}", "Hnull",
    ]
    write("coordinator_bodies", "session", "\n".join(lines))


def main():
    json_seeds()
    csv_seeds()
    avro_seeds()
    toml_seeds()
    coordinator_seeds()
    for d in sorted(CORPUS.iterdir()):
        print(f"{d.name}: {len(list(d.iterdir()))} seeds")


if __name__ == "__main__":
    main()
