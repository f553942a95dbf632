//! The `kafka` source: every partition of the configured topics is a shard, decoded many
//! messages at a time into Arrow batches.
//!
//! With `assignment = "assign"` (standalone and under the coordinator) one consumer per source
//! reads every partition the worker runs: each partition's messages are split off into a queue of
//! their own (`rd_kafka_queue_get_partition`) *before* the partition is added to the assignment
//! (`incremental_assign`), so no fetch can reach the shared queue first, and a partition that is
//! handed over is taken out with `incremental_unassign`, touching no other. One client instead of
//! one per partition: one fetch request serves every partition (a consume-only check with
//! confluent-kafka over 12 partitions used ~40% less client CPU this way). Each partition's queue
//! is read a batch at a time (`rd_kafka_consume_batch_queue`, see `BatchQueue`). With
//! `assignment = "group"` each partition the group gives this member is read by a consumer of its
//! own (the member's consumer is subscribed, and its assignment is the group's).
//!
//! Positions are offsets. A partition's offset is committed to the consumer group only once every
//! sink that received its records has made them durable (the runtime's acks), batched per
//! partition: a background thread commits the latest durable offsets every `commit_interval`, and
//! the end of a run commits them synchronously. Nothing is committed on a timer ahead of the sinks.
//!
//! Partitions are assigned explicitly (`assign`): standalone, one worker takes every partition of
//! its topics (or the `partitions` listed); the coordinator hands partitions to workers the same way.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, BinaryBuilder, Int32Array, Int64Array, ListBuilder, StringArray, StringBuilder, StructBuilder,
    TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use indexmap::IndexMap;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use tokio::sync::{mpsc, watch, OnceCell};
use tokio_util::sync::CancellationToken;

use super::file::{NoOptions, SchemaSpec};
use super::{Produced, ShardContext, Source};
use crate::batch::{PositionCommitter, ShardInfo, ShardKind};
use crate::config::types::schema_from_columns;
use crate::config::HumanDuration;
use crate::dead_letter::{BadRecord, Stage};
use crate::format::avro::{AvroDecoder, AvroOptions};
use crate::format::csv::{CsvDecoder, CsvOptions};
use crate::format::json::JsonDecoder;
use crate::format::{decode_chunk, ChunkDecoder, LineChunk};
use crate::kafka::{redact, Connection, SaslConfig, TlsConfig, REQUEST_TIMEOUT};
use crate::observe::names;
use crate::{Error, Result};

/// Default `commit_interval`.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// Default `max_wait`: how long a batch waits to fill before it is sent partly full.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(100);
/// How long a batch may wait for room downstream before its partition is paused.
const PAUSE_AFTER: Duration = Duration::from_millis(200);
/// Most payload bytes in one batch.
const MAX_CHUNK_BYTES: usize = 16 << 20;
/// How long one poll of a partition queue blocks, which bounds how late a stop is noticed.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// How long the final synchronous commit keeps trying through errors that pass (see
/// [`commit_error_passes`]).
const FINAL_COMMIT_PATIENCE: Duration = Duration::from_secs(30);

/// `[sources.ID] type = "kafka"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// Topics to read; every partition of each is a shard.
    pub topics: Vec<String>,
    /// Consumer group whose committed offsets are the positions (default `sluice-{pipeline}`).
    pub group_id: Option<String>,
    /// Where a partition without a committed offset starts.
    #[serde(default)]
    pub start: StartAt,
    /// How message values are encoded.
    pub format: KafkaFormat,
    /// Columns and SQL types of the decoded values (JSON and CSV).
    pub schema: Option<SchemaSpec>,
    /// Message metadata added as columns `_key`, `_topic`, `_partition`, `_offset`, `_timestamp`,
    /// `_headers`.
    #[serde(default)]
    pub metadata: Vec<MetadataField>,
    /// Only these partitions (of every topic), instead of all.
    pub partitions: Option<Vec<i32>>,
    /// `"assign"` (default): this worker reads the partitions it is given (all, standalone).
    #[serde(default)]
    pub assignment: Assignment,
    pub tls: Option<TlsConfig>,
    pub sasl: Option<SaslConfig>,
    /// Raw librdkafka client settings (`fetch.max.bytes`, `socket.keepalive.enable`, ...).
    #[serde(default)]
    pub librdkafka_options: IndexMap<String, String>,
    /// How often durable offsets are committed (default 1s).
    pub commit_interval: Option<HumanDuration>,
    /// Longest a batch waits to fill up to `batch_size` (default 100ms).
    pub max_wait: Option<HumanDuration>,
}

/// How partitions reach this worker.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Assignment {
    /// Explicit assignment: every partition of the topics (or `partitions`), or what the
    /// coordinator hands out.
    #[default]
    Assign,
    /// Kafka's consumer group with the cooperative-sticky assignor: several `sluice run`
    /// processes with the same `group_id` share the partitions, without a coordinator.
    Group,
}

/// `start = "earliest" | "latest" | "<RFC 3339 time>"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StartAt {
    #[default]
    Earliest,
    Latest,
    /// The first offset whose timestamp is at or after this time (milliseconds since the epoch).
    Time(i64),
}

impl<'de> Deserialize<'de> for StartAt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StartAt::parse(&s).map_err(de::Error::custom)
    }
}

impl StartAt {
    /// Parses `earliest`, `latest` or an RFC 3339 time.
    ///
    /// # Errors
    /// A message saying what is accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "earliest" => Ok(StartAt::Earliest),
            "latest" => Ok(StartAt::Latest),
            t => chrono::DateTime::parse_from_rfc3339(t).map(|t| StartAt::Time(t.timestamp_millis())).map_err(|e| {
                format!(
                    "start must be \"earliest\", \"latest\" or an RFC 3339 time such as \"2026-11-27T10:00:00Z\" ({e})"
                )
            }),
        }
    }
}

impl fmt::Display for StartAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartAt::Earliest => f.write_str("earliest"),
            StartAt::Latest => f.write_str("latest"),
            StartAt::Time(ms) => match chrono::DateTime::from_timestamp_millis(*ms) {
                Some(t) => write!(f, "{}", t.to_rfc3339()),
                None => write!(f, "{ms}ms"),
            },
        }
    }
}

/// `format = { type = "json" | "csv" | "avro" | "string" | "bytes" }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KafkaFormat {
    /// One JSON object per message.
    Json(NoOptions),
    /// One CSV record per message.
    Csv(CsvOptions),
    /// One Avro record per message: a plain binary body, or the Confluent wire format with a
    /// schema registry.
    Avro(AvroOptions),
    /// The value as one UTF-8 text column `value`.
    String(NoOptions),
    /// The value as one binary column `value`.
    Bytes(NoOptions),
}

/// A metadata column.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum MetadataField {
    Key,
    Topic,
    Partition,
    Offset,
    Timestamp,
    Headers,
}

impl MetadataField {
    fn field(self, key_binary: bool) -> Field {
        match self {
            MetadataField::Key => Field::new("_key", if key_binary { DataType::Binary } else { DataType::Utf8 }, true),
            MetadataField::Topic => Field::new("_topic", DataType::Utf8, false),
            MetadataField::Partition => Field::new("_partition", DataType::Int32, false),
            MetadataField::Offset => Field::new("_offset", DataType::Int64, false),
            MetadataField::Timestamp => {
                Field::new("_timestamp", DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), true)
            }
            MetadataField::Headers => Field::new("_headers", headers_type(), true),
        }
    }
}

/// `_headers`: a list of `{key, value}` (values are bytes; a header may repeat).
pub fn headers_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(header_fields()), true)))
}

fn header_fields() -> Fields {
    Fields::from(vec![Field::new("key", DataType::Utf8, false), Field::new("value", DataType::Binary, true)])
}

/// Reads Kafka partitions as shards.
pub struct KafkaSource {
    id: String,
    topics: Vec<String>,
    partitions: Option<Vec<i32>>,
    start: StartAt,
    connection: Connection,
    client_config: ClientConfig,
    format: KafkaFormat,
    assignment: Assignment,
    decoder: Option<Arc<dyn ChunkDecoder>>,
    avro: Option<Arc<AvroDecoder>>,
    schema: SchemaRef,
    metadata: Vec<MetadataField>,
    max_wait: Duration,
    commit_interval: Duration,
    session: OnceCell<Arc<Session>>,
    probe: std::sync::OnceLock<Arc<BaseConsumer<SourceContext>>>,
    committer: Arc<KafkaCommitter>,
}

impl KafkaSource {
    /// Checks the settings and derives the schema; connects nothing (validation runs offline).
    ///
    /// # Errors
    /// `(key, message)` naming the setting at fault.
    pub fn new(id: &str, pipeline: &str, config: &KafkaSourceConfig) -> Result<Self, (&'static str, String)> {
        if config.topics.is_empty() || config.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(("topics", "give at least one topic name, e.g. topics = [\"orders\"]".into()));
        }
        let connection = Connection {
            brokers: config.brokers.clone(),
            tls: config.tls.clone(),
            sasl: config.sasl.clone(),
            librdkafka_options: config.librdkafka_options.clone(),
        };
        let group_id = config.group_id.clone().unwrap_or_else(|| format!("sluice-{pipeline}"));
        let client_config = connection.client_config(&[
            ("group.id", &group_id),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            // Prefetch is bounded per partition; pauses stop fetching altogether.
            ("queued.max.messages.kbytes", "8192"),
            ("fetch.wait.max.ms", "100"),
            // Bounded reads learn about the end from partition EOF events too (past transaction
            // markers, which are never delivered).
            ("enable.partition.eof", "true"),
        ])?;
        let mut seen = std::collections::HashSet::new();
        for m in &config.metadata {
            if !seen.insert(*m) {
                return Err(("metadata", format!("`{m:?}` is listed twice")));
            }
        }
        let key_binary = matches!(config.format, KafkaFormat::Bytes(_) | KafkaFormat::Avro(_));
        let mut avro = None;
        let (payload, decoder): (SchemaRef, Option<Arc<dyn ChunkDecoder>>) = match (&config.format, &config.schema) {
            (KafkaFormat::Avro(_), Some(_)) => {
                return Err((
                    "schema",
                    "Avro values take their columns from `format.schema_file` (the reader schema); remove [sources.ID.schema]".into(),
                ))
            }
            (KafkaFormat::Avro(o), None) => {
                let d = Arc::new(AvroDecoder::new(o, None)?);
                let s = d.schema();
                avro = Some(d);
                (s, None)
            }
            (KafkaFormat::String(_) | KafkaFormat::Bytes(_), Some(_)) => {
                return Err(("schema", "`string` and `bytes` values are one column `value`; remove `schema`".into()))
            }
            (KafkaFormat::String(_), None) => (Arc::new(Schema::new(vec![Field::new("value", DataType::Utf8, false)])), None),
            (KafkaFormat::Bytes(_), None) => {
                (Arc::new(Schema::new(vec![Field::new("value", DataType::Binary, false)])), None)
            }
            (_, Some(SchemaSpec::Columns(cols))) => {
                let s = schema_from_columns(cols).map_err(|(col, m)| ("schema", format!("column `{col}`: {m}")))?;
                let d: Arc<dyn ChunkDecoder> = match &config.format {
                    KafkaFormat::Json(_) => Arc::new(JsonDecoder::new(s.clone())),
                    KafkaFormat::Csv(o) => {
                        if !o.delimiter.is_ascii() {
                            return Err(("format.delimiter", "the delimiter must be one ASCII character".into()));
                        }
                        Arc::new(CsvDecoder::new(s.clone(), o))
                    }
                    _ => unreachable!("string and bytes are handled above"),
                };
                (s, Some(d))
            }
            (_, Some(SchemaSpec::Infer)) => {
                return Err((
                    "schema",
                    "a Kafka source cannot infer its schema (topics change); list the columns: [sources.ID.schema] with `column = \"sql type\"` lines".into(),
                ))
            }
            (_, None) => {
                return Err((
                    "schema",
                    "JSON and CSV values need a schema: add [sources.ID.schema] with `column = \"sql type\"` lines".into(),
                ))
            }
        };
        let mut fields: Vec<Field> = payload.fields().iter().map(|f| f.as_ref().clone()).collect();
        for m in &config.metadata {
            let f = m.field(key_binary);
            if payload.field_with_name(f.name()).is_ok() {
                return Err(("metadata", format!("the schema already has a column `{}`", f.name())));
            }
            fields.push(f);
        }
        if config.assignment == Assignment::Group && config.partitions.is_some() {
            return Err((
                "partitions",
                "with assignment = \"group\" the consumer group assigns the partitions; remove `partitions`".into(),
            ));
        }
        if let Some(p) = &config.partitions {
            if p.is_empty() || p.iter().any(|p| *p < 0) {
                return Err(("partitions", "list partition numbers (0, 1, ...), or leave it out for all".into()));
            }
        }
        Ok(KafkaSource {
            id: id.to_string(),
            topics: config.topics.clone(),
            partitions: config.partitions.clone(),
            start: config.start,
            connection,
            client_config,
            format: config.format.clone(),
            assignment: config.assignment,
            decoder,
            avro,
            schema: Arc::new(Schema::new(fields)),
            metadata: config.metadata.clone(),
            max_wait: config.max_wait.map_or(DEFAULT_MAX_WAIT, |d| d.0),
            commit_interval: config.commit_interval.map_or(DEFAULT_COMMIT_INTERVAL, |d| d.0),
            session: OnceCell::new(),
            probe: std::sync::OnceLock::new(),
            committer: Arc::new(KafkaCommitter::new(id)),
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Service { component: self.id.clone(), message: redact(&message.into(), &self.connection) }
    }

    /// Connects, lists the partitions, resolves where each starts and (for bounded runs) ends,
    /// assigns them and splits one queue per partition.
    async fn connect(&self) -> Result<Arc<Session>> {
        let client_config = self.client_config.clone();
        let topics = self.topics.clone();
        let only = self.partitions.clone();
        let start = self.start;
        let source = self.id.clone();
        let committer = self.committer.clone();
        let interval = self.commit_interval;
        let group = self.assignment == Assignment::Group;
        let result = tokio::task::spawn_blocking(move || {
            Session::open(&source, client_config, &topics, only.as_deref(), start, committer, interval, group)
        })
        .await
        .map_err(|e| self.error(e.to_string()))?;
        result.map(Arc::new).map_err(|m| self.error(m))
    }

    /// Sets the consumer group's committed offset of every partition to `to` (`sluice reset`):
    /// the next run starts there. Returns (topic, partition, offset) of each.
    ///
    /// # Errors
    /// Unreachable brokers, unknown topics, a refused commit.
    pub async fn reset_positions(&self, to: StartAt) -> Result<Vec<(String, i32, i64)>> {
        let (config, topics, only, source) =
            (self.client_config.clone(), self.topics.clone(), self.partitions.clone(), self.id.clone());
        let result = tokio::task::spawn_blocking(move || -> Result<Vec<(String, i32, i64)>, String> {
            let consumer: BaseConsumer<SourceContext> = config
                .create_with_context(SourceContext::new(source.clone(), None))
                .map_err(|e| format!("cannot create the Kafka consumer: {e}"))?;
            let parts = resolve_partitions(&source, &consumer, &topics, only.as_deref(), to, false)?;
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.start)).map_err(|e| e.to_string())?;
            }
            consumer.commit(&tpl, CommitMode::Sync).map_err(|e| format!("committing the new offsets failed: {e}"))?;
            Ok(parts.into_iter().map(|p| (p.topic, p.partition, p.start)).collect())
        })
        .await
        .map_err(|e| self.error(e.to_string()))?;
        result.map_err(|m| self.error(m))
    }

    /// A consumer of the source's group that reads nothing: metadata, watermarks and committed
    /// offsets for the coordinator.
    fn probe(&self) -> Result<Arc<BaseConsumer<SourceContext>>> {
        if let Some(c) = self.probe.get() {
            return Ok(c.clone());
        }
        let c: BaseConsumer<SourceContext> = self
            .client_config
            .create_with_context(SourceContext::new(self.id.clone(), None))
            .map_err(|e| self.error(format!("cannot create the Kafka consumer: {e}")))?;
        Ok(self.probe.get_or_init(|| Arc::new(c)).clone())
    }

    fn partition_shard(&self, topic: &str, partition: i32) -> Arc<ShardInfo> {
        Arc::new(ShardInfo {
            source: self.id.clone(),
            id: format!("{topic}/{partition}"),
            kind: ShardKind::Partition { topic: topic.to_string(), partition },
            epoch: None,
        })
    }

    async fn session(&self) -> Result<Arc<Session>> {
        self.session.get_or_try_init(|| self.connect()).await.cloned()
    }

    fn decode(
        &self,
        chunk: &LineChunk,
        meta: &ChunkMeta,
        mut bad: Vec<BadRecord>,
    ) -> Result<(RecordBatch, Vec<u64>, Vec<BadRecord>)> {
        let (payload, positions) = match (&self.avro, &self.decoder) {
            (Some(d), _) => {
                let decoded = d.decode_chunk(chunk).map_err(|e| self.error(e))?;
                bad.extend(decoded.bad);
                (decoded.batch, decoded.positions)
            }
            (None, Some(d)) => {
                let decoded = decode_chunk(d.as_ref(), chunk).map_err(|e| self.error(e.to_string()))?;
                bad.extend(decoded.bad);
                (decoded.batch, decoded.positions)
            }
            (None, None) => {
                let mut positions = Vec::with_capacity(chunk.len());
                let col: ArrayRef = match self.format {
                    KafkaFormat::Bytes(_) => {
                        let mut b = BinaryBuilder::with_capacity(chunk.len(), chunk.buf.len());
                        for i in 0..chunk.len() {
                            b.append_value(chunk.record(i));
                            positions.push(chunk.positions[i]);
                        }
                        Arc::new(b.finish())
                    }
                    _ => {
                        let mut b = StringBuilder::with_capacity(chunk.len(), chunk.buf.len());
                        for i in 0..chunk.len() {
                            match std::str::from_utf8(chunk.record(i)) {
                                Ok(s) => {
                                    b.append_value(s);
                                    positions.push(chunk.positions[i]);
                                }
                                Err(e) => bad.push(BadRecord {
                                    position: Some(chunk.positions[i]),
                                    stage: Stage::Decode,
                                    error: format!(
                                        "the value is not valid UTF-8 ({e}); use format = {{ type = \"bytes\" }}"
                                    ),
                                    raw: chunk.record(i).to_vec(),
                                    key: chunk.key(i),
                                }),
                            }
                        }
                        Arc::new(b.finish())
                    }
                };
                let schema = Arc::new(Schema::new(vec![self.schema.field(0).clone()]));
                (RecordBatch::try_new(schema, vec![col]).map_err(|e| self.error(e.to_string()))?, positions)
            }
        };
        if self.metadata.is_empty() {
            let batch = RecordBatch::try_new(self.schema.clone(), payload.columns().to_vec())
                .map_err(|e| self.error(e.to_string()))?;
            return Ok((batch, positions, bad));
        }
        // Rows of the chunk that decoded, in order (offsets increase within a partition).
        let rows: Vec<usize> = positions
            .iter()
            .map(|p| chunk.positions.binary_search(p).expect("every decoded position comes from the chunk"))
            .collect();
        let mut columns = payload.columns().to_vec();
        let key_binary = matches!(self.format, KafkaFormat::Bytes(_) | KafkaFormat::Avro(_));
        for m in &self.metadata {
            columns.push(meta.column(*m, &rows, chunk, key_binary));
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| self.error(e.to_string()))?;
        Ok((batch, positions, bad))
    }
}

/// Per-message metadata of a chunk, beside the [`LineChunk`] that holds values and keys.
#[derive(Default)]
struct ChunkMeta {
    topic: String,
    partition: i32,
    timestamps: Vec<Option<i64>>,
    /// Per record: the range of its headers in `headers`.
    header_spans: Vec<(usize, usize)>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl ChunkMeta {
    fn column(&self, field: MetadataField, rows: &[usize], chunk: &LineChunk, key_binary: bool) -> ArrayRef {
        match field {
            MetadataField::Key => {
                if key_binary {
                    let mut b = BinaryBuilder::new();
                    for &i in rows {
                        b.append_option(chunk.key_bytes(i));
                    }
                    Arc::new(b.finish())
                } else {
                    let mut b = StringBuilder::new();
                    for &i in rows {
                        // Keys that are not UTF-8 were dead-lettered before decoding.
                        b.append_option(chunk.key_bytes(i).and_then(|k| std::str::from_utf8(k).ok()));
                    }
                    Arc::new(b.finish())
                }
            }
            MetadataField::Topic => Arc::new(StringArray::from_iter_values(rows.iter().map(|_| self.topic.as_str()))),
            MetadataField::Partition => Arc::new(Int32Array::from_value(self.partition, rows.len())),
            MetadataField::Offset => {
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|&i| chunk.positions[i] as i64)))
            }
            MetadataField::Timestamp => Arc::new(
                TimestampMillisecondArray::from_iter(rows.iter().map(|&i| self.timestamps[i])).with_timezone("UTC"),
            ),
            MetadataField::Headers => {
                let values = StructBuilder::from_fields(header_fields(), 0);
                let mut b = ListBuilder::new(values).with_field(Arc::new(Field::new(
                    "item",
                    DataType::Struct(header_fields()),
                    true,
                )));
                for &i in rows {
                    let (a, z) = self.header_spans[i];
                    for (k, v) in &self.headers[a..z] {
                        let s = b.values();
                        s.field_builder::<StringBuilder>(0).expect("key is a string").append_value(k);
                        s.field_builder::<BinaryBuilder>(1).expect("value is binary").append_option(v.as_deref());
                        s.append(true);
                    }
                    b.append(true);
                }
                Arc::new(b.finish())
            }
        }
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    async fn shards(&self) -> Result<Vec<Arc<ShardInfo>>> {
        let session = self.session().await?;
        Ok(session.partitions.iter().map(|p| self.partition_shard(&p.topic, p.partition)).collect())
    }

    async fn list_shards(&self) -> Result<Vec<Arc<ShardInfo>>> {
        let consumer = self.probe()?;
        let (topics, only) = (self.topics.clone(), self.partitions.clone());
        let listed = tokio::task::spawn_blocking(move || -> Result<Vec<(String, i32)>, String> {
            let mut out = Vec::new();
            for topic in &topics {
                let md = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(|e| {
                    let last = last_client_error(&consumer);
                    format!("cannot read the metadata of topic `{topic}` from the brokers: {e}{last}")
                })?;
                let Some(t) = md.topics().iter().find(|t| t.name() == topic && t.error().is_none()) else {
                    return Err(format!("topic `{topic}` does not exist on the brokers"));
                };
                let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                ids.sort_unstable();
                ids.retain(|p| only.as_ref().is_none_or(|o| o.contains(p)));
                out.extend(ids.into_iter().map(|p| (topic.clone(), p)));
            }
            Ok(out)
        })
        .await
        .map_err(|e| self.error(e.to_string()))?
        .map_err(|m| self.error(m))?;
        Ok(listed.iter().map(|(t, p)| self.partition_shard(t, *p)).collect())
    }

    async fn lag(&self, shards: &[Arc<ShardInfo>]) -> Result<std::collections::HashMap<String, super::ShardLag>> {
        let consumer = self.probe()?;
        let parts: Vec<(String, String, i32)> = shards
            .iter()
            .filter_map(|s| match &s.kind {
                ShardKind::Partition { topic, partition } => Some((s.id.clone(), topic.clone(), *partition)),
                _ => None,
            })
            .collect();
        let result = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let mut tpl = TopicPartitionList::new();
            for (_, t, p) in &parts {
                tpl.add_partition(t, *p);
            }
            let committed = consumer
                .committed_offsets(tpl, REQUEST_TIMEOUT)
                .map_err(|e| format!("cannot read the committed offsets of the consumer group: {e}"))?;
            let mut out = std::collections::HashMap::new();
            for (id, t, p) in parts {
                let (_, high) = consumer
                    .fetch_watermarks(&t, p, REQUEST_TIMEOUT)
                    .map_err(|e| format!("cannot read the offsets of {t}/{p}: {e}"))?;
                let c = match committed.find_partition(&t, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) if o >= 0 => Some(o as u64),
                    _ => None,
                };
                out.insert(id, super::ShardLag { end: high.max(0) as u64, committed: c });
            }
            Ok(out)
        })
        .await
        .map_err(|e| self.error(e.to_string()))?;
        result.map_err(|m| self.error(m))
    }

    fn committer(&self) -> Arc<dyn PositionCommitter> {
        self.committer.clone()
    }

    fn reads_all_shards_at_once(&self) -> bool {
        true
    }

    async fn read_shard(&self, ctx: ShardContext) -> Result<()> {
        let session = self.session().await?;
        let ShardKind::Partition { topic, partition } = &ctx.shard.kind else {
            return Err(self.error(format!("shard {} is not a Kafka partition", ctx.shard.id)));
        };
        let (topic, partition) = (topic.clone(), *partition);
        if let Some(group) = &session.group {
            return self.read_group_partition(&ctx, group, topic, partition).await;
        }
        let Some(range) = session.partitions.iter().find(|p| p.topic == topic && p.partition == partition).cloned()
        else {
            return Err(self.error(format!("partition {topic}/{partition} was not assigned to this worker")));
        };
        let end = if ctx.bounded { Some(range.end) } else { None };
        if end.is_some_and(|end| range.start >= end) {
            tracing::debug!(source = %self.id, topic, partition, "nothing to read up to the end offset");
            return Ok(());
        }
        self.read_from(&ctx, topic, partition, range.start, end, ctx.cancel.clone()).await
    }
}

impl KafkaSource {
    /// `assignment = "group"`: reads the partition whenever the group gives it to this member,
    /// from the group's committed offset, until the group takes it away (then waits for it again)
    /// or the run stops.
    async fn read_group_partition(
        &self,
        ctx: &ShardContext,
        group: &Arc<GroupState>,
        topic: String,
        partition: i32,
    ) -> Result<()> {
        if ctx.bounded {
            return Err(self.error(
                "`sluice run --bounded` reads every partition to its end, which assignment = \"group\" cannot promise (the group moves partitions); use assignment = \"assign\" for bounded runs",
            ));
        }
        if crate::fence::active() {
            return Err(self.error(
                "assignment = \"group\" cannot run under the coordinator, which assigns the partitions itself; use assignment = \"assign\"",
            ));
        }
        let key = (topic.clone(), partition);
        group.progress.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), ctx.progress.clone());
        let mut changes = group.changed.subscribe();
        loop {
            let revoked = loop {
                if let Some(t) = group.reading.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
                    break t.clone();
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return Ok(()) },
                    _ = ctx.cancel.cancelled() => return Ok(()),
                }
            };
            // From the group's committed offset: the previous owner committed before it let go.
            let probe = self.probe()?;
            let (source, t, start) = (self.id.clone(), topic.clone(), self.start);
            let begin = tokio::task::spawn_blocking(move || {
                resolve_partitions(&source, &probe, &[t], Some(&[partition]), start, true)
            })
            .await
            .map_err(|e| self.error(e.to_string()))?
            .map_err(|m| self.error(m))?
            .first()
            .map_or(0, |p| p.start);
            tracing::info!(source = %self.id, topic, partition, from = begin, "reading a partition the group assigned");
            let stop = CancellationToken::new();
            let (s, c, r) = (stop.clone(), ctx.cancel.clone(), revoked.clone());
            let relay = tokio::spawn(async move {
                tokio::select! {
                    _ = c.cancelled() => {}
                    _ = r.cancelled() => {}
                }
                s.cancel();
            });
            let result = self.read_from(ctx, topic.clone(), partition, begin, None, stop).await;
            relay.abort();
            result?;
            if ctx.cancel.is_cancelled() {
                return Ok(());
            }
            tracing::info!(source = %self.id, topic, partition, "the group took the partition away: stopped reading it");
        }
    }

    /// Reads `topic/partition` from `start` (to `end`, when bounded) until `cancel`.
    async fn read_from(
        &self,
        ctx: &ShardContext,
        topic: String,
        partition: i32,
        start: i64,
        end: Option<i64>,
        cancel: CancellationToken,
    ) -> Result<()> {
        let session = self.session().await?;
        let reader = {
            let (config, source, topic) = (self.client_config.clone(), self.id.clone(), topic.clone());
            let shared = session.group.is_none().then(|| session.consumer.clone());
            tokio::task::spawn_blocking(move || {
                PartitionReader::open(shared, &config, source, &topic, partition, start)
            })
            .await
            .map_err(|e| self.error(e.to_string()))?
            .map_err(|m| self.error(m))?
        };
        let consumer = reader.consumer().clone();
        let labels = [("component", self.id.clone()), ("topic", topic.clone()), ("partition", partition.to_string())];
        let consumed = metrics::counter!(names::KAFKA_CONSUMED_RECORDS_TOTAL, &labels);
        let consumed_bytes = metrics::counter!(names::KAFKA_CONSUMED_BYTES_TOTAL, &labels);
        let lag_seconds = metrics::gauge!(names::KAFKA_LAG_SECONDS, &labels);
        let lag_records = metrics::gauge!(names::KAFKA_LAG_RECORDS, &labels);
        let pauses = metrics::counter!(names::KAFKA_PAUSES_TOTAL, &labels);

        let (tx, mut rx) = mpsc::channel::<Result<(LineChunk, ChunkMeta, Vec<BadRecord>)>>(1);
        // The offset after the last message the reader took (-1: none yet), where a paused
        // partition must resume. librdkafka resumes at its own record of it, which an
        // end-of-partition event moves one past the next message (`rd_kafka_q_serve_rkmessages`
        // stores every event's offset + 1, the EOF's included): a record produced after the
        // partition was caught up, while the sink held the reader back, was skipped.
        let taken = Arc::new(AtomicI64::new(-1));
        let taken_r = taken.clone();
        // The last offset sought to (-1: none): messages from there up to the reader's next
        // offset are ones it already took, fetched again.
        let sought = Arc::new(AtomicI64::new(-1));
        let sought_r = sought.clone();
        let stop = cancel.clone();
        let batch_size = ctx.batch_size.max(1);
        let max_wait = self.max_wait;
        let want_headers = self.metadata.contains(&MetadataField::Headers);
        let key_utf8 = self.metadata.contains(&MetadataField::Key)
            && !matches!(self.format, KafkaFormat::Bytes(_) | KafkaFormat::Avro(_));
        let raw_values = self.avro.is_some();
        let (topic_r, component) = (topic.clone(), self.id.clone());
        let reader = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            let consumer = reader.consumer().clone();
            let mut reached_end = false;
            let mut next_offset: Option<i64> = None;
            // Records between the next offset to read and the partition's end (see cached_high).
            let topic_c = std::ffi::CString::new(topic_r.as_str()).ok();
            let record_lag = |next: Option<i64>| {
                if let (Some(next), Some(high)) =
                    (next, topic_c.as_ref().and_then(|t| cached_high(&consumer, t, partition)))
                {
                    lag_records.set((high - next).max(0) as f64);
                }
            };
            // The last chunk's size: the next one reserves as much at its first message (not
            // before: an idle partition holds no buffer while it waits).
            let (mut last_records, mut last_bytes) = (0, 0);
            while !cancel.is_cancelled() && !reached_end {
                let mut chunk = LineChunk::new();
                let mut meta = ChunkMeta { topic: topic_r.clone(), partition, ..Default::default() };
                let mut bad = Vec::new();
                let mut deadline: Option<Instant> = None;
                let mut newest_ts = None;
                let (mut records, mut bytes) = (0u64, 0u64);
                // A read takes every message it waited for (they leave librdkafka's queue), so
                // a chunk can pass MAX_CHUNK_BYTES by one read: by at most what the queue holds,
                // which queued.max.messages.kbytes bounds.
                while chunk.len() + bad.len() < batch_size && chunk.buf.len() < MAX_CHUNK_BYTES && !reached_end {
                    if cancel.is_cancelled() {
                        break;
                    }
                    // Until the chunk's first message, one message at a time in slices (a stop
                    // is noticed within one); then the rest of the chunk until its deadline.
                    let (wait, max) = match deadline {
                        None => (POLL_SLICE, 1),
                        Some(d) => {
                            let wait = d.saturating_duration_since(Instant::now());
                            if wait.is_zero() {
                                break;
                            }
                            (wait.min(POLL_SLICE), batch_size - chunk.len() - bad.len())
                        }
                    };
                    let mut polled_any = false;
                    reader.read(wait, max, |polled| {
                        polled_any = true;
                        let msg = match polled {
                            Polled::Eof => {
                                // Caught up with the high watermark of the last fetch. The
                                // consumer's position is then past any transaction markers at the
                                // end (they are never delivered); stop if it has reached the end.
                                // The event alone is not trusted: a broker can report a stale
                                // watermark.
                                if let Some(end) = end {
                                    let position = consumer
                                        .position()
                                        .ok()
                                        .and_then(|t| t.find_partition(&topic_r, partition).map(|e| e.offset()));
                                    if matches!(position, Some(Offset::Offset(o)) if o >= end) {
                                        reached_end = true;
                                    }
                                }
                                return !reached_end;
                            }
                            Polled::Error(e) => {
                                tracing::warn!(source = %component, topic = %topic_r, partition, "consumer error: {e}");
                                return true;
                            }
                            Polled::Message(msg) => msg,
                        };
                        let offset = msg.offset();
                        if let Some(n) = next_offset.filter(|&n| offset < n) {
                            let from = sought_r.load(Ordering::Acquire);
                            if from >= 0 && offset >= from {
                                // Fetched again after a resume's seek: already taken.
                                return true;
                            }
                            // Not a seek of ours (the log was truncated and rewritten, say):
                            // read, and said.
                            tracing::warn!(source = %component, topic = %topic_r, partition, expected = n, offset, "the partition went back to an earlier offset");
                        }
                        taken_r.store(offset + 1, Ordering::Release);
                        if next_offset.is_some_and(|n| offset > n) {
                            // Normal for compacted topics and transaction markers (an earlier
                            // offset was warned of above).
                            tracing::debug!(source = %component, topic = %topic_r, partition, expected = ?next_offset, offset, "offset gap");
                        }
                        next_offset = Some(offset + 1);
                        if end.is_some_and(|end| offset >= end) {
                            reached_end = true;
                            return false;
                        }
                        if records == 0 {
                            chunk.reserve(last_records, last_bytes);
                            meta.timestamps.reserve(last_records);
                            meta.header_spans.reserve(last_records);
                        }
                        let position = offset as u64;
                        let key = msg.key();
                        let ts = msg.timestamp();
                        newest_ts = ts.or(newest_ts);
                        let payload = msg.payload();
                        records += 1;
                        bytes += payload.map_or(0, <[u8]>::len) as u64;
                        let problem = match payload {
                            None => Some("the message has no value (a tombstone)".to_string()),
                            Some(_) if key_utf8 && key.is_some_and(|k| std::str::from_utf8(k).is_err()) => Some(
                                "the key is not valid UTF-8; use format = { type = \"bytes\" } to read binary keys"
                                    .to_string(),
                            ),
                            Some(_) => None,
                        };
                        if let Some(error) = problem {
                            bad.push(BadRecord {
                                position: Some(position),
                                stage: Stage::Decode,
                                error,
                                raw: payload.unwrap_or_default().to_vec(),
                                key: key.map(<[u8]>::to_vec),
                            });
                        } else {
                            if raw_values {
                                chunk.push_keyed_raw(payload.unwrap_or_default(), position, key);
                            } else {
                                chunk.push_keyed(payload.unwrap_or_default(), position, key);
                            }
                            meta.timestamps.push(ts);
                            let from = meta.headers.len();
                            if want_headers {
                                msg.headers(&mut meta.headers);
                            }
                            meta.header_spans.push((from, meta.headers.len()));
                        }
                        if end.is_some_and(|end| offset + 1 >= end) {
                            reached_end = true;
                        }
                        !reached_end
                    });
                    if deadline.is_none() {
                        if records > 0 {
                            deadline = Some(Instant::now() + max_wait);
                        } else if !polled_any {
                            lag_seconds.set(0.0);
                            record_lag(next_offset);
                        }
                    }
                }
                consumed.increment(records);
                consumed_bytes.increment(bytes);
                if let Some(ts) = newest_ts {
                    let now = chrono::Utc::now().timestamp_millis();
                    lag_seconds.set(((now - ts).max(0) as f64) / 1000.0);
                }
                record_lag(next_offset);
                (last_records, last_bytes) = (chunk.len(), chunk.buf.len());
                if (!chunk.is_empty() || !bad.is_empty()) && tx.blocking_send(Ok((chunk, meta, bad))).is_err() {
                    return;
                }
            }
        });

        let tpl = {
            let mut t = TopicPartitionList::new();
            t.add_partition(&topic, partition);
            t
        };
        let mut result = Ok(());
        loop {
            let item = tokio::select! {
                item = rx.recv() => item,
                _ = stop.cancelled() => break,
            };
            let (chunk, meta, bad) = match item {
                Some(Ok(x)) => x,
                Some(Err(e)) => {
                    result = Err(e);
                    break;
                }
                None => break,
            };
            let first = chunk.positions.first().copied().into_iter().chain(bad.iter().filter_map(|b| b.position)).min();
            let last = chunk.positions.last().copied().into_iter().chain(bad.iter().filter_map(|b| b.position)).max();
            let (Some(first), Some(last)) = (first, last) else { continue };
            let raw_bytes = chunk.buf.len();
            if let Some(avro) = &self.avro {
                if let Err(e) = avro.prepare(&chunk).await {
                    result = Err(self.error(e));
                    break;
                }
            }
            let (data, positions, mut bad) = match self.decode(&chunk, &meta, bad) {
                Ok(x) => x,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            bad.sort_by_key(|b| b.position);
            let produced = Produced { data, positions, bad, first, last, raw_bytes };
            // Backpressure: when the budget or the downstream channel stays full, stop fetching
            // this partition instead of letting librdkafka prefetch more. Not at the first full
            // channel: a pause drops what librdkafka has prefetched, to be fetched again.
            let emit = ctx.emit(produced);
            tokio::pin!(emit);
            let mut paused = false;
            let emitted = tokio::select! {
                r = &mut emit => r,
                _ = tokio::time::sleep(PAUSE_AFTER) => {
                    paused = true;
                    pauses.increment(1);
                    if let Err(e) = consumer.pause(&tpl) {
                        tracing::warn!(source = %self.id, topic, partition, "pausing the partition failed: {e}");
                    }
                    emit.await
                }
            };
            if paused {
                // Where the reader stopped, not where librdkafka thinks it did (see `taken`).
                let next = taken.load(Ordering::Acquire);
                // A stop does not need the position (the committed offset is where the next
                // run starts), and a failed seek must not turn it into an error.
                if next >= 0 && !stop.is_cancelled() {
                    sought.store(next, Ordering::Release);
                    let (c, t) = (consumer.clone(), topic.clone());
                    let moved = tokio::task::spawn_blocking(move || {
                        c.seek(&t, partition, Offset::Offset(next), Duration::from_secs(10)).map_err(|e| e.to_string())
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                    if let Err(e) = moved {
                        result = Err(self.error(format!(
                            "{topic} partition {partition}: moving back to offset {next} before resuming failed ({e}); \
                             stopping, to read again from the committed offset"
                        )));
                        break;
                    }
                }
                if let Err(e) = consumer.resume(&tpl) {
                    tracing::warn!(source = %self.id, topic, partition, "resuming the partition failed: {e}");
                }
            }
            if let Err(e) = emitted {
                result = Err(e);
                break;
            }
        }
        drop(rx);
        reader.await.map_err(|e| self.error(e.to_string()))?;
        result
    }
}

/// One partition this worker reads: where it starts, and its end when the run started.
#[derive(Debug, Clone)]
struct PartitionRange {
    topic: String,
    partition: i32,
    start: i64,
    end: i64,
}

/// How one partition is read.
enum PartitionReader {
    /// The session's consumer, the partition's messages split off into a queue of their own
    /// (`rd_kafka_queue_get_partition`, forwarded nowhere), read a batch at a time; the partition
    /// leaves the assignment when this is dropped.
    Shared { consumer: Arc<BaseConsumer<SourceContext>>, queue: BatchQueue, topic: String, partition: i32 },
    /// A consumer of its own, assigned only this partition (`assignment = "group"`).
    Own(Arc<BaseConsumer<SourceContext>>),
}

impl PartitionReader {
    /// Starts reading `topic/partition` at `start`: on `shared` (split first, then assigned), or
    /// else on a new consumer made from `config`.
    fn open(
        shared: Option<Arc<BaseConsumer<SourceContext>>>,
        config: &ClientConfig,
        source: String,
        topic: &str,
        partition: i32,
        start: i64,
    ) -> Result<Self, String> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start)).map_err(|e| e.to_string())?;
        let Some(consumer) = shared else {
            let c: BaseConsumer<SourceContext> = config
                .create_with_context(SourceContext::new(source, None))
                .map_err(|e| format!("cannot create the Kafka consumer: {e}"))?;
            c.assign(&tpl).map_err(|e| format!("cannot assign {topic}/{partition}: {e}"))?;
            return Ok(PartitionReader::Own(Arc::new(c)));
        };
        // Split before assigning: the partition's first fetch then already goes to its own queue.
        let queue = BatchQueue::split(&consumer, topic, partition)
            .ok_or_else(|| format!("cannot read {topic}/{partition}: librdkafka gave no queue for it"))?;
        consumer.incremental_assign(&tpl).map_err(|e| format!("cannot assign {topic}/{partition}: {e}"))?;
        Ok(PartitionReader::Shared { consumer, queue, topic: topic.to_string(), partition })
    }

    fn consumer(&self) -> &Arc<BaseConsumer<SourceContext>> {
        match self {
            PartitionReader::Shared { consumer, .. } | PartitionReader::Own(consumer) => consumer,
        }
    }

    /// Waits up to `timeout` for up to `max` messages (or events), and hands each to `f` in
    /// order until `f` returns false; the rest of what was read is dropped. A consumer of its own
    /// is polled once (one message at most).
    fn read(&mut self, timeout: Duration, max: usize, mut f: impl FnMut(Polled<'_>) -> bool) {
        match self {
            PartitionReader::Shared { queue, .. } => queue.read(timeout, max, f),
            PartitionReader::Own(consumer) => match consumer.poll(timeout) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    f(Polled::Eof);
                }
                Some(Err(e)) => {
                    f(Polled::Error(e.to_string()));
                }
                // SAFETY: the message lives until `msg` is dropped, after `f` returns.
                Some(Ok(msg)) => {
                    f(Polled::Message(unsafe { RawMessage::new(msg.ptr()) }));
                }
            },
        }
    }
}

impl Drop for PartitionReader {
    fn drop(&mut self) {
        if let PartitionReader::Shared { consumer, topic, partition, .. } = self {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, *partition);
            if let Err(e) = consumer.incremental_unassign(&tpl) {
                tracing::warn!(topic = %topic, partition = *partition, "taking the partition out of the assignment failed: {e}");
            }
        }
    }
}

/// What one read of a partition gave.
enum Polled<'a> {
    Message(RawMessage<'a>),
    /// Caught up with the high watermark of the last fetch.
    Eof,
    Error(String),
}

/// A partition's queue split off a consumer, read with `rd_kafka_consume_batch_queue`: one call
/// takes many messages, where rdkafka's `poll` takes one per call (an event, a clock read, a lock
/// and an allocation per message: about a tenth of the source's CPU). rdkafka has no batch read,
/// and keeps the queue of its own `PartitionQueue` private, so this holds the native queue.
struct BatchQueue {
    queue: std::ptr::NonNull<rdkafka::bindings::rd_kafka_queue_t>,
    /// The messages of the last read (destroyed before the next one).
    messages: Vec<*mut rdkafka::bindings::rd_kafka_message_t>,
    /// The queue belongs to this client, which must outlive it.
    _consumer: Arc<BaseConsumer<SourceContext>>,
}

// SAFETY: librdkafka queues may be used from any thread; the message pointers are only touched
// inside `read`, which borrows the queue mutably.
unsafe impl Send for BatchQueue {}

impl BatchQueue {
    /// The queue of `topic/partition` on `consumer`, forwarded nowhere (as rdkafka's
    /// `split_partition_queue`): the partition's messages stay on it. None when librdkafka has no
    /// such partition handle.
    fn split(consumer: &Arc<BaseConsumer<SourceContext>>, topic: &str, partition: i32) -> Option<Self> {
        let topic = std::ffi::CString::new(topic).ok()?;
        // SAFETY: the client pointer is valid while `consumer` lives (the queue keeps it); the
        // topic is a valid C string for the call.
        let queue = unsafe {
            rdkafka::bindings::rd_kafka_queue_get_partition(consumer.client().native_ptr(), topic.as_ptr(), partition)
        };
        let queue = std::ptr::NonNull::new(queue)?;
        // SAFETY: `queue` is the valid queue just returned; a null destination unforwards it.
        unsafe { rdkafka::bindings::rd_kafka_queue_forward(queue.as_ptr(), std::ptr::null_mut()) };
        Some(BatchQueue { queue, messages: Vec::new(), _consumer: consumer.clone() })
    }

    /// Waits up to `timeout` until `max` messages are on the queue, takes them (fewer at the
    /// timeout), and hands each to `f` until it returns false; all are destroyed before this
    /// returns.
    fn read(&mut self, timeout: Duration, max: usize, mut f: impl FnMut(Polled<'_>) -> bool) {
        let max = max.max(1);
        self.messages.clear();
        self.messages.reserve(max);
        let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `messages` has room for `max` pointers, which librdkafka fills from the front
        // and counts in its return value (-1 on error, when it writes none).
        let n = unsafe {
            rdkafka::bindings::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                timeout_ms,
                self.messages.as_mut_ptr(),
                max,
            )
        };
        // SAFETY: the first `n` slots were written, each a message this call now owns.
        unsafe { self.messages.set_len(n.clamp(0, max as isize) as usize) };
        let mut more = true;
        for &m in &self.messages {
            if more {
                // SAFETY: `m` is a valid message until it is destroyed below.
                let raw = unsafe { RawMessage::new(m) };
                more = f(match raw.error() {
                    None => Polled::Message(raw),
                    Some(rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF) => Polled::Eof,
                    Some(_) => Polled::Error(raw.error_text()),
                });
            }
            // SAFETY: each message is destroyed once, and not used afterwards.
            unsafe { rdkafka::bindings::rd_kafka_message_destroy(m) };
        }
        self.messages.clear();
    }
}

impl Drop for BatchQueue {
    fn drop(&mut self) {
        // SAFETY: the queue is valid and destroyed once; its client is still alive (held).
        unsafe { rdkafka::bindings::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// A view of one consumed librdkafka message, valid while the message is.
struct RawMessage<'a>(&'a rdkafka::bindings::rd_kafka_message_t);

impl RawMessage<'_> {
    /// # Safety
    /// `m` must be a valid message that outlives the view.
    unsafe fn new<'a>(m: *const rdkafka::bindings::rd_kafka_message_t) -> RawMessage<'a> {
        RawMessage(&*m)
    }

    fn error(&self) -> Option<rdkafka::bindings::rd_kafka_resp_err_t> {
        (self.0.err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then_some(self.0.err)
    }

    /// The error of a message that carries one, as librdkafka words it.
    fn error_text(&self) -> String {
        // SAFETY: librdkafka returns a NUL-terminated string that lives as long as the message.
        unsafe { std::ffi::CStr::from_ptr(rdkafka::bindings::rd_kafka_message_errstr(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    fn offset(&self) -> i64 {
        self.0.offset
    }

    /// `len` bytes at `ptr`, a field of the message, living as long as it does.
    fn bytes(&self, ptr: *mut std::ffi::c_void, len: usize) -> Option<&[u8]> {
        // SAFETY: librdkafka's pointer and length describe bytes owned by the message.
        (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
    }

    fn payload(&self) -> Option<&[u8]> {
        self.bytes(self.0.payload, self.0.len)
    }

    fn key(&self) -> Option<&[u8]> {
        self.bytes(self.0.key, self.0.key_len)
    }

    /// The message's timestamp (create or log-append time), in milliseconds.
    fn timestamp(&self) -> Option<i64> {
        let mut kind = rdkafka::bindings::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: the message is valid; librdkafka writes only `kind`.
        let ts = unsafe { rdkafka::bindings::rd_kafka_message_timestamp(self.0, &mut kind) };
        // -1 is "none" too, as rdkafka's `Timestamp::to_millis` reads it.
        (kind != rdkafka::bindings::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ts != -1)
            .then_some(ts)
    }

    /// Appends the message's headers (name, value) to `out`.
    fn headers(&self, out: &mut Vec<(String, Option<Vec<u8>>)>) {
        let mut headers = std::ptr::null_mut();
        // SAFETY: the message is valid; librdkafka sets `headers` to a list the message owns.
        let err = unsafe { rdkafka::bindings::rd_kafka_message_headers(self.0, &mut headers) };
        if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
            return;
        }
        for i in 0.. {
            let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
            // SAFETY: `headers` is valid while the message is; librdkafka writes the three
            // out-parameters, pointing into the list.
            let err =
                unsafe { rdkafka::bindings::rd_kafka_header_get_all(headers, i, &mut name, &mut value, &mut size) };
            if err != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            // SAFETY: `name` is a NUL-terminated string and `value` (when set) `size` bytes, both
            // in the list.
            let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned();
            let value =
                (!value.is_null()).then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) }.to_vec());
            out.push((name, value));
        }
    }
}

/// The connected consumer of one source.
struct Session {
    /// Standalone and under the coordinator, it reads every partition (see [`PartitionReader`]).
    consumer: Arc<BaseConsumer<SourceContext>>,
    partitions: Vec<PartitionRange>,
    /// `assignment = "group"`: what the group gives this member.
    group: Option<Arc<GroupState>>,
    stop: Arc<AtomicBool>,
    poller: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.poller.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    fn open(
        source: &str,
        client_config: ClientConfig,
        topics: &[String],
        only: Option<&[i32]>,
        start: StartAt,
        committer: Arc<KafkaCommitter>,
        commit_interval: Duration,
        group: bool,
    ) -> Result<Session, String> {
        let group = group.then(|| Arc::new(GroupState::new(source, committer.clone())));
        let mut client_config = client_config;
        if group.is_some() {
            client_config.set("partition.assignment.strategy", "cooperative-sticky");
        }
        let context = SourceContext::new(source.to_string(), group.clone());
        let consumer: BaseConsumer<SourceContext> =
            client_config.create_with_context(context).map_err(|e| format!("cannot create the Kafka consumer: {e}"))?;
        let consumer = Arc::new(consumer);
        let partitions = resolve_partitions(source, &consumer, topics, only, start, true)?;
        committer.attach(consumer.clone());
        if let Some(g) = &group {
            committer.gate(g.committable.clone());
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&names).map_err(|e| format!("cannot join consumer group for {names:?}: {e}"))?;
            tracing::info!(source, topics = ?names, "joined the consumer group (cooperative-sticky)");
        }
        let stop = Arc::new(AtomicBool::new(false));
        // This thread polls the consumer's main queue: commit results and errors (and, as a group
        // member, rebalances; the partitions the group gives it are paused at once and read by
        // per-partition consumers). Standalone, the partitions' messages go to their own queues.
        let poller = {
            let (consumer, stop, committer) = (consumer.clone(), stop.clone(), committer.clone());
            let source = source.to_string();
            let grouped = group.is_some();
            std::thread::Builder::new()
                .name(format!("kafka-{source}"))
                .spawn(move || {
                    let mut last_commit = Instant::now();
                    while !stop.load(Ordering::SeqCst) {
                        match consumer.poll(POLL_SLICE) {
                            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                            Some(Ok(m)) if !grouped => tracing::error!(
                                source = %source,
                                topic = m.topic(),
                                partition = m.partition(),
                                offset = m.offset(),
                                "a message reached the consumer's main queue instead of its partition's queue (a bug: please report it)"
                            ),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => tracing::warn!(source = %source, "Kafka client: {e}"),
                        }
                        if last_commit.elapsed() >= commit_interval {
                            if let Err(e) = committer.commit_pending(CommitMode::Async) {
                                tracing::warn!(source = %source, "committing offsets failed (retried): {e}");
                            }
                            last_commit = Instant::now();
                        }
                    }
                })
                .map_err(|e| format!("cannot start the Kafka poll thread: {e}"))?
        };
        Ok(Session { consumer, partitions, group, stop, poller: Mutex::new(Some(poller)) })
    }
}

/// Lists the partitions of `topics` (or `only` those numbers) and where each starts: the group's
/// committed offset when `use_committed` and there is one, else `start`; and each one's end now.
fn resolve_partitions(
    source: &str,
    consumer: &BaseConsumer<SourceContext>,
    topics: &[String],
    only: Option<&[i32]>,
    start: StartAt,
    use_committed: bool,
) -> Result<Vec<PartitionRange>, String> {
    let mut wanted = Vec::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT).map_err(|e| {
            let last = last_client_error(consumer);
            format!("cannot read the metadata of topic `{topic}` from the brokers: {e}{last}")
        })?;
        let t = md.topics().iter().find(|t| t.name() == topic);
        let Some(t) = t.filter(|t| t.error().is_none() && !t.partitions().is_empty()) else {
            let why = t.and_then(|t| t.error()).map(|e| format!(" ({e:?})")).unwrap_or_default();
            return Err(format!("topic `{topic}` does not exist on the brokers{why}"));
        };
        let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        if let Some(only) = only {
            for p in only {
                if !ids.contains(p) {
                    return Err(format!("topic `{topic}` has no partition {p} (it has {})", ids.len()));
                }
            }
            ids.retain(|p| only.contains(p));
        }
        wanted.extend(ids.into_iter().map(|p| (topic.clone(), p)));
    }
    let mut tpl = TopicPartitionList::new();
    for (t, p) in &wanted {
        tpl.add_partition(t, *p);
    }
    let committed = if use_committed {
        consumer
            .committed_offsets(tpl.clone(), REQUEST_TIMEOUT)
            .map_err(|e| format!("cannot read the committed offsets of the consumer group: {e}"))?
    } else {
        TopicPartitionList::new()
    };
    let by_time = match start {
        StartAt::Time(ms) => {
            let mut t = TopicPartitionList::new();
            for (topic, p) in &wanted {
                t.add_partition_offset(topic, *p, Offset::Offset(ms)).map_err(|e| e.to_string())?;
            }
            Some(
                consumer
                    .offsets_for_times(t, REQUEST_TIMEOUT)
                    .map_err(|e| format!("cannot look up offsets for start = \"{start}\": {e}"))?,
            )
        }
        _ => None,
    };
    let mut partitions = Vec::new();
    for (topic, p) in &wanted {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, REQUEST_TIMEOUT)
            .map_err(|e| format!("cannot read the offsets of {topic}/{p}: {e}"))?;
        let committed = committed.find_partition(topic, *p).map(|e| e.offset());
        let begin = match committed {
            Some(Offset::Offset(o)) if o >= 0 => o.max(low),
            _ => match start {
                StartAt::Earliest => low,
                StartAt::Latest => high,
                StartAt::Time(_) => {
                    match by_time.as_ref().and_then(|t| t.find_partition(topic, *p)).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) if o >= 0 => o,
                        _ => high,
                    }
                }
            },
        };
        tracing::info!(source, topic, partition = p, start = begin, end = high, committed = ?committed, "partition");
        partitions.push(PartitionRange { topic: topic.clone(), partition: *p, start: begin, end: high });
    }
    Ok(partitions)
}

/// Longest a revoked partition waits for its records in flight to become durable (and be
/// committed) before the group may give it to another member; past it, the new owner reads them
/// again (at-least-once).
const REVOKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A set of (topic, partition), shared.
type PartitionSet = Arc<Mutex<std::collections::HashSet<(String, i32)>>>;

/// What the consumer group (`assignment = "group"`) gives this member, shared between the
/// member's rebalance callbacks and the per-partition readers.
pub struct GroupState {
    source: String,
    /// Partitions to read now, each with the token its revocation cancels.
    reading: Mutex<std::collections::HashMap<(String, i32), CancellationToken>>,
    /// Partitions whose offsets may be committed: those read, and those being revoked until
    /// their last commit.
    committable: PartitionSet,
    /// Each partition's acknowledgement tracker (records in flight).
    progress: Mutex<std::collections::HashMap<(String, i32), Arc<crate::batch::ShardProgress>>>,
    /// Bumped on every assignment change.
    changed: watch::Sender<u64>,
    committer: Arc<KafkaCommitter>,
}

impl GroupState {
    fn new(source: &str, committer: Arc<KafkaCommitter>) -> Self {
        GroupState {
            source: source.to_string(),
            reading: Mutex::default(),
            committable: Arc::default(),
            progress: Mutex::default(),
            changed: watch::channel(0).0,
            committer,
        }
    }

    fn keys(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
        tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
    }

    fn owned(&self) -> usize {
        self.reading.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// After the group assigned `tpl`: the member itself fetches nothing (paused); the readers
    /// start.
    fn assigned(&self, consumer: &BaseConsumer<SourceContext>, tpl: &TopicPartitionList) {
        if let Err(e) = consumer.pause(tpl) {
            tracing::warn!(source = %self.source, "pausing the group member's own fetch failed: {e}");
        }
        let keys = Self::keys(tpl);
        {
            let mut reading = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            let mut committable = self.committable.lock().unwrap_or_else(|e| e.into_inner());
            for k in &keys {
                committable.insert(k.clone());
                reading.entry(k.clone()).or_default();
            }
        }
        metrics::counter!(names::KAFKA_REBALANCES_TOTAL, "component" => self.source.clone(), "kind" => "assign")
            .increment(1);
        metrics::gauge!(names::KAFKA_GROUP_PARTITIONS, "component" => self.source.clone()).set(self.owned() as f64);
        tracing::info!(source = %self.source, partitions = ?keys, owned = self.owned(), "the group assigned partitions");
        self.changed.send_modify(|v| *v += 1);
    }

    /// Before the group takes `tpl` away: stop reading them, wait (up to [`REVOKE_TIMEOUT`]) for
    /// their records in flight to become durable, commit, and only then let go.
    fn revoking(&self, tpl: &TopicPartitionList) {
        let keys = Self::keys(tpl);
        if keys.is_empty() {
            return;
        }
        {
            let mut reading = self.reading.lock().unwrap_or_else(|e| e.into_inner());
            for k in &keys {
                if let Some(t) = reading.remove(k) {
                    t.cancel();
                }
            }
        }
        self.changed.send_modify(|v| *v += 1);
        let started = Instant::now();
        let busy = || {
            let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            keys.iter().filter(|k| progress.get(*k).is_some_and(|p| p.in_flight() > 0)).count()
        };
        while busy() > 0 && started.elapsed() < REVOKE_TIMEOUT {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = busy();
        if left > 0 {
            tracing::warn!(source = %self.source, partitions = left, "revoked partitions still had records in flight after {REVOKE_TIMEOUT:?}: their new owner reads them again");
        }
        if let Err(e) = self.committer.commit_pending(CommitMode::Sync) {
            tracing::warn!(source = %self.source, "committing the offsets of revoked partitions failed (their new owner reads from the last commit): {e}");
        }
        {
            let mut committable = self.committable.lock().unwrap_or_else(|e| e.into_inner());
            for k in &keys {
                committable.remove(k);
            }
        }
        metrics::counter!(names::KAFKA_REBALANCES_TOTAL, "component" => self.source.clone(), "kind" => "revoke")
            .increment(1);
        metrics::gauge!(names::KAFKA_GROUP_PARTITIONS, "component" => self.source.clone()).set(self.owned() as f64);
        tracing::info!(source = %self.source, partitions = ?keys, drained_ms = started.elapsed().as_millis() as u64, "gave partitions back to the group");
    }
}

/// Client callbacks: librdkafka errors, commit results and statistics into logs and metrics.
pub struct SourceContext {
    source: String,
    /// Set on the group member of `assignment = "group"`.
    group: Option<Arc<GroupState>>,
    /// The last error librdkafka logged or reported (a failed TLS handshake, a refused login):
    /// added to errors such as a metadata timeout, which alone do not say why.
    last_error: Mutex<Option<String>>,
}

impl SourceContext {
    fn new(source: String, group: Option<Arc<GroupState>>) -> Self {
        SourceContext { source, group, last_error: Mutex::new(None) }
    }

    fn remember(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// `"; the last client error: ..."`, or nothing: why a request such as a metadata fetch failed
/// (a TLS handshake refused, a login rejected), which its own error does not say. rdkafka queues
/// librdkafka's logs and errors on the client's main queue (`log.queue`), so the context sees them
/// only when the consumer is polled: this polls it for up to two seconds until one arrives. Only
/// on a failure path, before any offset is committed: a message it might read is dropped.
/// Blocking: call it off the async threads.
fn last_client_error(consumer: &BaseConsumer<SourceContext>) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let last = consumer.context().last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(e) = last {
            return format!("; the last client error: {e}");
        }
        if Instant::now() >= deadline {
            return String::new();
        }
        let _ = consumer.poll(Duration::from_millis(50));
    }
}

/// The high watermark of `partition` as of the last fetch response, which librdkafka keeps
/// (`rd_kafka_get_watermark_offsets`: no request to the broker, unlike `fetch_watermarks`);
/// None before the first fetch. rdkafka has no safe wrapper for it. The lag gauge is built on
/// this, not on librdkafka's statistics: their consumer_lag counts from the offset store, which
/// sluice leaves empty (it commits explicit offsets), so it is always -1.
fn cached_high(consumer: &BaseConsumer<SourceContext>, topic: &std::ffi::CStr, partition: i32) -> Option<i64> {
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` is borrowed; `topic` is a valid C
    // string for the call; librdkafka only writes the two i64s it is given and copies nothing.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

impl ClientContext for SourceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", source = %self.source, "librdkafka: {fac} {message}");
                self.remember(message.to_string());
            }
            L::Warning => tracing::warn!(target: "librdkafka", source = %self.source, "librdkafka: {fac} {message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // End of a partition (an empty one at start too): expected, the poll loop sees it.
        if matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
        tracing::warn!(source = %self.source, "Kafka client error: {error}: {reason}");
        self.remember(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        if let (Some(g), rdkafka::consumer::Rebalance::Revoke(tpl)) = (&self.group, rebalance) {
            g.revoking(tpl);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        match (&self.group, rebalance) {
            (Some(g), rdkafka::consumer::Rebalance::Assign(tpl)) => g.assigned(consumer, tpl),
            (Some(_), rdkafka::consumer::Rebalance::Error(e)) => {
                tracing::warn!(source = %self.source, "consumer group rebalance failed: {e}")
            }
            _ => {}
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        let labels = [
                            ("component", self.source.clone()),
                            ("topic", e.topic().to_string()),
                            ("partition", e.partition().to_string()),
                        ];
                        metrics::gauge!(names::KAFKA_COMMITTED_OFFSET, &labels).set(o as f64);
                    }
                }
            }
            Err(e) => {
                metrics::counter!(names::KAFKA_COMMIT_ERRORS_TOTAL, "component" => self.source.clone()).increment(1);
                tracing::warn!(source = %self.source, "committing offsets failed (retried with the next commit): {e}");
            }
        }
    }
}

/// Queues each partition's durable offset and commits the latest ones in batches.
pub struct KafkaCommitter {
    source: String,
    consumer: std::sync::OnceLock<Arc<BaseConsumer<SourceContext>>>,
    /// Next offset to read (committed position + 1) per partition, not yet sent to Kafka.
    pending: Mutex<IndexMap<(String, i32), i64>>,
    /// Sent, but perhaps not yet acknowledged: sent again by `flush` so that it is synchronous.
    /// Held for the whole of a commit, so two commits never interleave: the poll thread's
    /// asynchronous commit of an older offset could otherwise reach the broker after `flush`'s
    /// synchronous one and move the group's position back (records read again on the next run).
    sent: Mutex<IndexMap<(String, i32), i64>>,
    /// `assignment = "group"`: only these partitions' offsets are committed (a partition the group
    /// gave to another member is that member's to commit).
    gate: std::sync::OnceLock<PartitionSet>,
    /// Worker mode: the epoch of the grant each partition is read under ([`ShardInfo::epoch`]),
    /// checked again when its queued offset is sent.
    read_at: Mutex<std::collections::HashMap<(String, i32), u64>>,
}

impl KafkaCommitter {
    fn new(source: &str) -> Self {
        KafkaCommitter {
            source: source.to_string(),
            consumer: std::sync::OnceLock::new(),
            pending: Mutex::new(IndexMap::new()),
            sent: Mutex::new(IndexMap::new()),
            gate: std::sync::OnceLock::new(),
            read_at: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn attach(&self, consumer: Arc<BaseConsumer<SourceContext>>) {
        let _ = self.consumer.set(consumer);
    }

    fn gate(&self, committable: PartitionSet) {
        let _ = self.gate.set(committable);
    }

    /// Commits what is pending; returns the error of a synchronous commit.
    fn commit_pending(&self, mode: CommitMode) -> rdkafka::error::KafkaResult<()> {
        let Some(consumer) = self.consumer.get() else { return Ok(()) };
        // `sent` first: taking `pending` before it would let another commit overtake this one.
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let batch = match mode {
            CommitMode::Sync => {
                let mut all = std::mem::take(&mut *sent);
                all.extend(pending);
                all
            }
            CommitMode::Async => pending,
        };
        // Worker mode: a shard that moved away, or a lease that ran out while the offsets waited
        // here, commits nothing (the shard's new owner has read from the last commit).
        let read_at = self.read_at.lock().unwrap_or_else(|e| e.into_inner());
        let batch: IndexMap<(String, i32), i64> = batch
            .into_iter()
            .filter(|((t, p), o)| match crate::fence::check_id(
                &self.source,
                &format!("{t}/{p}"),
                read_at.get(&(t.clone(), *p)).copied(),
            ) {
                Ok(_) => true,
                Err(why) => {
                    tracing::warn!(source = %self.source, "not committing offset {o} of {t}/{p}: fenced: {why}");
                    false
                }
            })
            .filter(|((t, p), o)| {
                let Some(gate) = self.gate.get() else { return true };
                let ok = gate.lock().unwrap_or_else(|e| e.into_inner()).contains(&(t.clone(), *p));
                if !ok {
                    tracing::warn!(source = %self.source, "not committing offset {o} of {t}/{p}: the group gave the partition to another member");
                }
                ok
            })
            .collect();
        drop(read_at);
        if batch.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &batch {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        let r = consumer.commit(&tpl, mode);
        match mode {
            CommitMode::Async => sent.extend(batch),
            CommitMode::Sync if r.is_err() => {
                // Keep them for the next try.
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (k, v) in batch {
                    pending.entry(k).and_modify(|o| *o = (*o).max(v)).or_insert(v);
                }
            }
            CommitMode::Sync => {
                tracing::debug!(source = %self.source, partitions = tpl.count(), "offsets committed");
            }
        }
        r
    }
}

/// Whether a failed commit may succeed if sent again: the coordinator is being looked up, is
/// loading or moved, or the request did not get through. A commit refused for the group's state
/// (an unknown member, a stale generation) does not pass by waiting.
fn commit_error_passes(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::WaitingForCoordinator
                | C::CoordinatorLoadInProgress
                | C::CoordinatorNotAvailable
                | C::NotCoordinator
                | C::RequestTimedOut
                | C::OperationTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::NetworkException
                | C::RebalanceInProgress
        )
    )
}

#[async_trait]
impl PositionCommitter for KafkaCommitter {
    fn commit(&self, shard: &ShardInfo, position: u64) {
        let ShardKind::Partition { topic, partition } = &shard.kind else { return };
        if let Err(why) = crate::fence::check(shard) {
            tracing::warn!(source = %self.source, "not committing offset {position} of {}: fenced: {why}", shard.id);
            return;
        }
        let next = position as i64 + 1;
        if let Some(epoch) = shard.epoch {
            self.read_at.lock().unwrap_or_else(|e| e.into_inner()).insert((topic.clone(), *partition), epoch);
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.entry((topic.clone(), *partition)).and_modify(|o| *o = (*o).max(next)).or_insert(next);
        metrics::counter!(names::COMMITS_TOTAL, "component" => shard.source.clone()).increment(1);
    }

    /// Commits synchronously. A commit that fails because the group coordinator is not known
    /// yet (a broker that has just restarted, a coordinator moving) is tried again for up to
    /// [`FINAL_COMMIT_PATIENCE`]: a graceful stop should not read the records again next run, nor
    /// exit with an error, for a state that passes in seconds.
    async fn flush(&self) -> Result<()> {
        if self.consumer.get().is_none() {
            return Ok(());
        }
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let e = match crate::sink::blocking(|| self.commit_pending(CommitMode::Sync)) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let wait = Duration::from_millis(250 << attempt.min(4));
            if !commit_error_passes(&e) || started.elapsed() + wait > FINAL_COMMIT_PATIENCE {
                return Err(Error::Service {
                    component: self.source.clone(),
                    message: format!(
                        "committing the final offsets failed after {attempt} attempt(s) in {:.1}s: {e} (they are read again on the next run)",
                        started.elapsed().as_secs_f64()
                    ),
                });
            }
            tracing::warn!(source = %self.source, attempt, "committing the final offsets failed, retrying in {wait:?}: {e}");
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn a_final_commit_is_tried_again_only_for_errors_that_pass() {
        for code in [C::WaitingForCoordinator, C::NotCoordinator, C::CoordinatorLoadInProgress, C::AllBrokersDown] {
            assert!(commit_error_passes(&KafkaError::ConsumerCommit(code)), "{code:?} passes");
        }
        for code in [C::UnknownMemberId, C::IllegalGeneration, C::GroupAuthorizationFailed, C::OffsetOutOfRange] {
            assert!(!commit_error_passes(&KafkaError::ConsumerCommit(code)), "{code:?} does not pass");
        }
        assert!(!commit_error_passes(&KafkaError::Canceled), "an error without a code does not pass");
    }
}
