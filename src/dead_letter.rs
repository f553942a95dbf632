//! The dead-letter path: bad records, with their error, position and raw bytes, as one Arrow schema
//! that any sink can write (the `[dead_letter]` table; NDJSON in files).

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, Int32Builder, Int64Builder, StringBuilder, StructArray, UInt64Builder};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use base64::Engine;
use tokio::sync::mpsc;

use crate::batch::{Ack, Batch, ShardInfo, ShardKind};
use crate::observe::ComponentMetrics;
use crate::{Error, Result};

/// Where in the pipeline a record went bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The bytes are not a valid record of the format (broken JSON, wrong CSV column count).
    Decode,
    /// The record does not fit the schema (`"abc"` for a decimal, null in a `not null` column).
    Convert,
    /// A transform failed on the record (a failing cast, division by zero).
    Transform,
    /// A sink refused the record.
    Write,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Convert => "convert",
            Stage::Transform => "transform",
            Stage::Write => "write",
        }
    }
}

/// One record that could not be processed.
#[derive(Debug, Clone)]
pub struct BadRecord {
    /// Source position of the record, when known.
    pub position: Option<u64>,
    pub stage: Stage,
    pub error: String,
    /// The record's original bytes (for transform errors: the row as JSON).
    pub raw: Vec<u8>,
    /// The record's key, for sources that have one (Kafka).
    pub key: Option<Vec<u8>>,
}

fn position_fields() -> Fields {
    Fields::from(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("shard", DataType::Utf8, false),
        Field::new("file", DataType::Utf8, true),
        Field::new("line", DataType::UInt64, true),
        Field::new("index", DataType::UInt64, true),
        Field::new("topic", DataType::Utf8, true),
        Field::new("partition", DataType::Int32, true),
        Field::new("offset", DataType::Int64, true),
    ])
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("time", DataType::Utf8, false),
        Field::new("component", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("position", DataType::Struct(position_fields()), false),
        Field::new("raw", DataType::Utf8, false),
        Field::new("raw_encoding", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, true),
        Field::new("key_encoding", DataType::Utf8, true),
    ]))
});

/// The schema of dead-letter records.
pub fn schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Hands bad records to the dead-letter sink, or fails the pipeline when there is none.
#[derive(Clone)]
pub struct DeadLetter {
    tx: Option<mpsc::Sender<Batch>>,
}

impl DeadLetter {
    pub fn new(tx: Option<mpsc::Sender<Batch>>) -> Self {
        DeadLetter { tx }
    }

    /// A dead letter without a sink: the first bad record is an error.
    pub fn none() -> Self {
        DeadLetter { tx: None }
    }

    pub fn is_configured(&self) -> bool {
        self.tx.is_some()
    }

    /// Sends `records`, found by `metrics.component` in a batch of `shard`, to the dead-letter sink.
    /// The batch's `ack` travels with them, so the source position is committed only once the dead
    /// letters are durable.
    ///
    /// # Errors
    /// [`Error::BadRecord`] for the first record when no dead-letter sink is configured; an internal
    /// error when the dead-letter sink has stopped.
    pub async fn send(
        &self,
        metrics: &ComponentMetrics,
        shard: &Arc<ShardInfo>,
        ack: &Ack,
        records: Vec<BadRecord>,
    ) -> Result<()> {
        let Some(first) = records.first() else { return Ok(()) };
        for stage in [Stage::Decode, Stage::Convert, Stage::Transform, Stage::Write] {
            let n = records.iter().filter(|r| r.stage == stage).count();
            if n > 0 {
                metrics.error(stage.as_str(), n);
            }
        }
        let Some(tx) = &self.tx else {
            return Err(Error::BadRecord {
                component: metrics.component.clone(),
                position: first.position.map(|p| shard.describe(p)).unwrap_or_else(|| format!("shard {}", shard.id)),
                error: first.error.clone(),
            });
        };
        metrics.dead_lettered(records.len());
        let first_pos = records.iter().filter_map(|r| r.position).min().unwrap_or(0);
        let last_pos = records.iter().filter_map(|r| r.position).max().unwrap_or(0);
        let data = to_batch(&metrics.component, shard, &records);
        let batch = Batch {
            data,
            shard: shard.clone(),
            first: first_pos,
            last: last_pos,
            row_positions: None,
            ack: ack.clone(),
            memory: None,
        };
        tx.send(batch).await.map_err(|_| Error::Internal {
            component: metrics.component.clone(),
            message: "the dead-letter sink has stopped".into(),
        })
    }
}

/// `(text, "utf8")` when `raw` is valid UTF-8, else `(base64, "base64")`.
pub fn encode_raw(raw: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(raw) {
        Ok(s) => (s.to_string(), "utf8"),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(raw), "base64"),
    }
}

fn to_batch(component: &str, shard: &ShardInfo, records: &[BadRecord]) -> RecordBatch {
    let n = records.len();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut time = StringBuilder::with_capacity(n, n * now.len());
    let mut comp = StringBuilder::new();
    let mut stage = StringBuilder::new();
    let mut error = StringBuilder::new();
    let mut raw = StringBuilder::new();
    let mut enc = StringBuilder::new();
    let (mut p_source, mut p_shard, mut p_file) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    let (mut p_line, mut p_index) = (UInt64Builder::new(), UInt64Builder::new());
    let (mut p_topic, mut p_partition, mut p_offset) = (StringBuilder::new(), Int32Builder::new(), Int64Builder::new());
    let (mut key, mut key_enc) = (StringBuilder::new(), StringBuilder::new());
    for r in records {
        time.append_value(&now);
        comp.append_value(component);
        stage.append_value(r.stage.as_str());
        error.append_value(&r.error);
        let (text, encoding) = encode_raw(&r.raw);
        raw.append_value(text);
        enc.append_value(encoding);
        match r.key.as_deref().map(encode_raw) {
            Some((text, encoding)) => {
                key.append_value(text);
                key_enc.append_value(encoding);
            }
            None => {
                key.append_null();
                key_enc.append_null();
            }
        }
        p_source.append_value(&shard.source);
        p_shard.append_value(&shard.id);
        match &shard.kind {
            ShardKind::File { path, .. } => {
                p_file.append_value(path);
                p_line.append_option(r.position);
                p_index.append_null();
            }
            ShardKind::Sequence => {
                p_file.append_null();
                p_line.append_null();
                p_index.append_option(r.position);
            }
            ShardKind::Partition { .. } => {
                p_file.append_null();
                p_line.append_null();
                p_index.append_null();
            }
        }
        match &shard.kind {
            ShardKind::Partition { topic, partition } => {
                p_topic.append_value(topic);
                p_partition.append_value(*partition);
                p_offset.append_option(r.position.map(|p| p as i64));
            }
            _ => {
                p_topic.append_null();
                p_partition.append_null();
                p_offset.append_null();
            }
        }
    }
    let position = StructArray::new(
        position_fields(),
        vec![
            Arc::new(p_source.finish()) as ArrayRef,
            Arc::new(p_shard.finish()),
            Arc::new(p_file.finish()),
            Arc::new(p_line.finish()),
            Arc::new(p_index.finish()),
            Arc::new(p_topic.finish()),
            Arc::new(p_partition.finish()),
            Arc::new(p_offset.finish()),
        ],
        None,
    );
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(time.finish()),
            Arc::new(comp.finish()),
            Arc::new(stage.finish()),
            Arc::new(error.finish()),
            Arc::new(position),
            Arc::new(raw.finish()),
            Arc::new(enc.finish()),
            Arc::new(key.finish()),
            Arc::new(key_enc.finish()),
        ],
    )
    .expect("dead-letter columns match the dead-letter schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_are_text_or_base64() {
        assert_eq!(encode_raw("héllo".as_bytes()), ("héllo".to_string(), "utf8"));
        assert_eq!(encode_raw(&[0xff, 0x00]), ("/wA=".to_string(), "base64"));
    }

    #[tokio::test]
    async fn without_a_sink_the_first_bad_record_is_an_error_naming_it() {
        let shard = Arc::new(ShardInfo {
            source: "in".into(),
            id: "a.json".into(),
            kind: ShardKind::File { path: "a.json".into(), version: None },
            epoch: None,
        });
        let m = ComponentMetrics::new("in");
        let rec = BadRecord {
            position: Some(7),
            stage: Stage::Decode,
            error: "expected value".into(),
            raw: b"{oops".to_vec(),
            key: None,
        };
        let err = DeadLetter::none().send(&m, &shard, &Ack::detached(shard.clone()), vec![rec]).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("a.json:7") && msg.contains("expected value") && msg.contains("`in`"), "{msg}");
    }

    #[tokio::test]
    async fn records_become_one_batch_with_positions() {
        let shard = Arc::new(ShardInfo {
            source: "in".into(),
            id: "a.json".into(),
            kind: ShardKind::File { path: "a.json".into(), version: None },
            epoch: None,
        });
        let (tx, mut rx) = mpsc::channel(1);
        let m = ComponentMetrics::new("in");
        let recs = vec![
            BadRecord { position: Some(3), stage: Stage::Decode, error: "e1".into(), raw: b"x".to_vec(), key: None },
            BadRecord {
                position: Some(9),
                stage: Stage::Convert,
                error: "e2".into(),
                raw: vec![0xfe],
                key: Some(b"k1".to_vec()),
            },
        ];
        DeadLetter::new(Some(tx)).send(&m, &shard, &Ack::detached(shard.clone()), recs).await.unwrap();
        let b = rx.recv().await.unwrap();
        assert_eq!((b.data.num_rows(), b.first, b.last), (2, 3, 9));
        assert_eq!(m.stats.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 2);
        let enc = b.data.column_by_name("raw_encoding").unwrap();
        let enc = enc.as_any().downcast_ref::<arrow::array::StringArray>().unwrap();
        assert_eq!((enc.value(0), enc.value(1)), ("utf8", "base64"));
        let key = b.data.column_by_name("key").unwrap();
        let key = key.as_any().downcast_ref::<arrow::array::StringArray>().unwrap();
        assert!(arrow::array::Array::is_null(key, 0));
        assert_eq!(key.value(1), "k1");
    }
}
