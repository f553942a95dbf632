//! Entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`, cargo-fuzz) and of the test that
//! replays their corpora in CI (`tests/it/fuzz_corpora.rs`). Each takes arbitrary bytes, must
//! return without panicking, hanging or allocating without bound, and checks the promise the
//! code under it makes: every record comes out either as a row or as a bad record, never both,
//! never neither.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use indexmap::IndexMap;

use crate::batch::{ShardInfo, ShardKind};
use crate::coordinator::server::{Core, Timing};
use crate::coordinator::{HeartbeatRequest, LeaveRequest};
use crate::format::avro::{AvroDecoder, AvroOptions, RegistryConfig};
use crate::format::csv::{CsvDecoder, CsvOptions, RecordSplitter};
use crate::format::json::JsonDecoder;
use crate::format::{decode_chunk, Decoded, LineChunk};

/// The columns the JSON and CSV targets decode into: every kind of type a schema can name.
fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let columns: IndexMap<String, String> = [
                ("order_id", "bigint not null"),
                ("amount", "decimal(12,2)"),
                ("ts", "timestamp"),
                ("country", "varchar"),
                ("tags", "varchar[]"),
                ("paid", "boolean"),
                ("ratio", "double"),
                ("day", "date"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            crate::config::types::schema_from_columns(&columns).expect("a valid schema")
        })
        .clone()
}

fn check(decoded: &Decoded, chunk: &LineChunk) {
    assert_eq!(decoded.batch.num_rows() + decoded.bad.len(), chunk.len(), "every record is a row or a bad record");
    assert_eq!(decoded.positions.len(), decoded.batch.num_rows());
    let mut seen: Vec<u64> = decoded.positions.clone();
    seen.extend(decoded.bad.iter().filter_map(|b| b.position));
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), chunk.len(), "no record is both a row and a bad record");
}

/// The columns of [`schema`] but the list: every type the JSON fast path decodes.
fn flat_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let s = schema();
            let fields: Vec<_> = s.fields().iter().filter(|f| f.name() != "tags").cloned().collect();
            std::sync::Arc::new(arrow::datatypes::Schema::new(fields))
        })
        .clone()
}

/// NDJSON: one record per line. Decoded with the list column (arrow-json alone), and without it
/// both ways, with the fast path and with arrow-json alone: the two must come out equal, rows,
/// bad records and errors.
pub fn json(data: &[u8]) {
    let mut chunk = LineChunk::new();
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        chunk.push(line, i as u64);
    }
    let decoder = JsonDecoder::new(schema());
    let decoded = decode_chunk(&decoder, &chunk).expect("good rows concatenate");
    check(&decoded, &chunk);

    static FAST: OnceLock<(JsonDecoder, JsonDecoder)> = OnceLock::new();
    let (fast, arrow_only) =
        FAST.get_or_init(|| (JsonDecoder::always_fast(flat_schema()), JsonDecoder::arrow_only(flat_schema())));
    assert!(fast.has_fast_path());
    let a = decode_chunk(fast, &chunk).expect("good rows concatenate");
    let b = decode_chunk(arrow_only, &chunk).expect("good rows concatenate");
    check(&a, &chunk);
    assert_eq!(a.batch, b.batch, "the fast path decodes as arrow-json does");
    assert_eq!(a.positions, b.positions);
    let bad = |d: &Decoded| d.bad.iter().map(|r| (r.position, r.stage, r.error.clone())).collect::<Vec<_>>();
    assert_eq!(bad(&a), bad(&b), "the same bad records, with the same errors");
}

/// CSV: records split as the file source splits them (a quoted field may span lines).
pub fn csv(data: &[u8]) {
    let mut chunk = LineChunk::new();
    let mut splitter = RecordSplitter::new(b',');
    let mut record: Vec<u8> = Vec::new();
    let mut n = 0u64;
    for line in data.split(|b| *b == b'\n') {
        if !record.is_empty() {
            record.push(b'\n');
        }
        record.extend_from_slice(line);
        if splitter.line_ends_record(line) {
            chunk.push(&record, n);
            n += 1;
            record.clear();
        }
    }
    if !record.is_empty() {
        chunk.push(&record, n);
    }
    let decoder = CsvDecoder::new(schema(), &CsvOptions::default());
    let decoded = decode_chunk(&decoder, &chunk).expect("good rows concatenate");
    check(&decoded, &chunk);
}

const ORDER_V1: &str = r#"{"type":"record","name":"Order","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer","type":["null","string"],"default":null},
  {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}},
  {"name":"tags","type":{"type":"array","items":"string"}},
  {"name":"status","type":{"type":"enum","name":"Status","symbols":["paid","shipped","cancelled"]}},
  {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}}]}"#;

/// An evolved writer schema: one more field, with a default in the reader's view.
const ORDER_V2: &str = r#"{"type":"record","name":"Order","fields":[
  {"name":"order_id","type":"long"},
  {"name":"customer","type":["null","string"],"default":null},
  {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}},
  {"name":"tags","type":{"type":"array","items":"string"}},
  {"name":"status","type":{"type":"enum","name":"Status","symbols":["paid","shipped","cancelled"]}},
  {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}},
  {"name":"note","type":"string","default":""}]}"#;

fn schema_file() -> &'static Path {
    static FILE: OnceLock<std::path::PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("sluice-fuzz-order-{}.avsc", std::process::id()));
        std::fs::write(&path, ORDER_V1).expect("the temporary directory is writable");
        path
    })
}

/// Splits `data` into records: each is prefixed by its length (one byte).
fn length_prefixed(data: &[u8]) -> LineChunk {
    let mut chunk = LineChunk::new();
    let mut rest = data;
    let mut n = 0u64;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        chunk.push_keyed_raw(&tail[..len], n, None);
        n += 1;
        rest = &tail[len..];
    }
    chunk
}

/// Plain Avro bodies (length-prefixed records) against the reader schema.
pub fn avro(data: &[u8]) {
    static DECODER: OnceLock<AvroDecoder> = OnceLock::new();
    let decoder = DECODER.get_or_init(|| {
        let options = AvroOptions { schema_file: schema_file().to_path_buf(), schema_registry: None };
        AvroDecoder::new(&options, None).expect("a valid reader schema")
    });
    let chunk = length_prefixed(data);
    let decoded = decoder.decode_chunk(&chunk).expect("the decoder builds");
    check(&decoded, &chunk);
}

/// The Confluent wire format (length-prefixed records), writer schemas 1 (the reader's) and 2
/// (evolved) known, every other id unknown; no registry is asked.
pub fn confluent(data: &[u8]) {
    static DECODER: OnceLock<AvroDecoder> = OnceLock::new();
    let decoder = DECODER.get_or_init(|| {
        let registry =
            RegistryConfig { url: "http://127.0.0.1:9".into(), username: None, password: None, timeout: None };
        let options = AvroOptions { schema_file: schema_file().to_path_buf(), schema_registry: Some(registry) };
        let d = AvroDecoder::new(&options, None).expect("a valid reader schema");
        d.insert_writer_schema(1, ORDER_V1).expect("v1 resolves");
        d.insert_writer_schema(2, ORDER_V2).expect("v2 resolves");
        d
    });
    let chunk = length_prefixed(data);
    let decoded = decoder.decode_chunk(&chunk).expect("the decoder builds");
    check(&decoded, &chunk);
}

/// A pipeline file: parsed and checked as `sluice validate` does before planning SQL (TOML,
/// `${VAR}` interpolation, components, schemas, the `inputs` graph). `HOME` is the only variable.
pub fn pipeline_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = |name: &str| (name == "HOME").then(|| "/home/fuzz".to_string());
    if let Err(e) = crate::config::load_str(Path::new("fuzz.toml"), text, env) {
        assert!(!e.diagnostics.is_empty(), "an invalid pipeline says why");
    }
}

/// Coordinator API bodies, one per line, `H` (heartbeat) or `L` (leave) then the JSON body,
/// driven through the coordinator's state machine as its HTTP handlers do, a second apart.
pub fn coordinator_bodies(data: &[u8]) {
    let t0 = Instant::now();
    let timing = Timing {
        lease_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(2),
        refresh_interval: Duration::from_secs(5),
    };
    let mut core = Core::new(timing, t0);
    let shards: Vec<ShardInfo> = (0..4)
        .map(|i| ShardInfo {
            source: "orders".into(),
            id: format!("t/{i}"),
            kind: ShardKind::Partition { topic: "t".into(), partition: i },
            epoch: None,
        })
        .collect();
    core.set_shards(shards, t0);
    for (n, line) in data.split(|b| *b == b'\n').enumerate() {
        let now = t0 + Duration::from_secs(n as u64);
        match line.split_first() {
            Some((b'H', body)) => {
                if let Ok(req) = serde_json::from_slice::<HeartbeatRequest>(body) {
                    if !req.worker_id.is_empty() {
                        core.heartbeat(&req, now);
                    }
                }
            }
            Some((b'L', body)) => {
                if let Ok(req) = serde_json::from_slice::<LeaveRequest>(body) {
                    core.leave(&req.worker_id, now);
                }
            }
            _ => {}
        }
        let status = core.status("fuzz", now);
        let _ = serde_json::to_string(&status).expect("the status serializes");
    }
}

/// A fuzz target: takes any bytes, panics only on a bug.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("json", json),
    ("csv", csv),
    ("avro", avro),
    ("confluent", confluent),
    ("pipeline_toml", pipeline_toml),
    ("coordinator_bodies", coordinator_bodies),
];
