//! The `kafka` sink: each row becomes one message (JSON or CSV value, a key column, headers), sent
//! by an idempotent producer. A batch's ack is dropped only when every message of it is delivered
//! (acknowledged by the brokers) or, after librdkafka's retries, dead-lettered with the error.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use indexmap::IndexMap;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientContext;
use serde::Deserialize;
use tokio::task::JoinHandle;

use super::Sink;
use crate::batch::Batch;
use crate::dead_letter::{BadRecord, DeadLetter, Stage};
use crate::kafka::{redact, Connection, SaslConfig, TlsConfig};
use crate::observe::{names, ComponentMetrics};
use crate::{Error, Result};

/// Longest `finish` waits for outstanding deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Batches whose deliveries may be outstanding at once.
const MAX_IN_FLIGHT_BATCHES: usize = 64;

/// `[sinks.ID] type = "kafka"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Bootstrap brokers, comma separated.
    pub brokers: String,
    /// The topic every record goes to.
    pub topic: Option<String>,
    /// Or: a column naming each record's topic.
    pub topic_column: Option<String>,
    /// Column whose value is the message key (its text form; binary columns as they are).
    pub key: Option<String>,
    /// Columns sent as headers (header name = column name, value = the column's text form).
    /// A `_headers` column (from a Kafka source's `metadata`) is always passed through.
    #[serde(default)]
    pub headers: Vec<String>,
    /// How the value is encoded (default `json`).
    #[serde(default)]
    pub format: ValueFormat,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd` (default `lz4`).
    pub compression: Option<String>,
    /// Idempotent producer: no duplicates or reordering from retries (default true).
    #[serde(default = "yes")]
    pub idempotent: bool,
    pub tls: Option<TlsConfig>,
    pub sasl: Option<SaslConfig>,
    #[serde(default)]
    pub librdkafka_options: IndexMap<String, String>,
}

fn yes() -> bool {
    true
}

/// `format = "json" | "csv" | "string" | "bytes"`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// The row's value columns as one JSON object.
    #[default]
    Json,
    /// The row's value columns as one CSV record (no header).
    Csv,
    /// The single value column's text, as is.
    String,
    /// The single value column's bytes, as is.
    Bytes,
}

/// Metadata columns a Kafka source adds; never part of the value.
const METADATA_COLUMNS: &[&str] = &["_key", "_topic", "_partition", "_offset", "_timestamp", "_headers"];

/// Producer callbacks into logs.
pub struct SinkContext {
    component: String,
}

impl ClientContext for SinkContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(component = %self.component, "Kafka producer error: {error}: {reason}");
    }
}

/// Sends rows as Kafka messages.
pub struct KafkaSink {
    component: String,
    /// Created on the first write (validation connects nothing).
    producer: Option<FutureProducer<SinkContext>>,
    client_config: rdkafka::ClientConfig,
    connection: Connection,
    topic: Option<String>,
    topic_column: Option<usize>,
    key: Option<usize>,
    headers: Vec<usize>,
    passthrough_headers: Option<usize>,
    value_columns: Vec<usize>,
    value_schema: SchemaRef,
    format: ValueFormat,
    dead_letter: DeadLetter,
    metrics: ComponentMetrics,
    in_flight: VecDeque<JoinHandle<Result<()>>>,
}

impl KafkaSink {
    /// # Errors
    /// `(key, message)` naming the setting at fault.
    pub fn new(
        id: &str,
        config: &KafkaSinkConfig,
        schema: &SchemaRef,
        metrics: ComponentMetrics,
    ) -> Result<Self, (&'static str, String)> {
        let connection = Connection {
            brokers: config.brokers.clone(),
            tls: config.tls.clone(),
            sasl: config.sasl.clone(),
            librdkafka_options: config.librdkafka_options.clone(),
        };
        let compression = config.compression.clone().unwrap_or_else(|| "lz4".into());
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&compression.as_str()) {
            return Err(("compression", format!("`{compression}` is not one of none, gzip, snappy, lz4, zstd")));
        }
        let idempotent = if config.idempotent { "true" } else { "false" };
        let client_config = connection.client_config(&[
            ("enable.idempotence", idempotent),
            ("compression.type", &compression),
            ("linger.ms", "20"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.kbytes", "65536"),
        ])?;
        let column = |key: &'static str, name: &str| {
            schema.index_of(name).map_err(|_| {
                let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                (key, format!("column `{name}` is not in the sink's input; it has: {}", have.join(", ")))
            })
        };
        let (topic, topic_column) = match (&config.topic, &config.topic_column) {
            (Some(t), None) if !t.trim().is_empty() => (Some(t.clone()), None),
            (None, Some(c)) => {
                let i = column("topic_column", c)?;
                if schema.field(i).data_type() != &DataType::Utf8 {
                    return Err(("topic_column", format!("column `{c}` must be text (varchar)")));
                }
                (None, Some(i))
            }
            (Some(_), Some(_)) => return Err(("topic", "give either `topic` or `topic_column`, not both".into())),
            _ => return Err(("topic", "name the topic: topic = \"orders-clean\" (or topic_column)".into())),
        };
        let key = config.key.as_deref().map(|k| column("key", k)).transpose()?;
        let headers = config.headers.iter().map(|h| column("headers", h)).collect::<Result<Vec<_>, _>>()?;
        let passthrough_headers = schema.index_of("_headers").ok();
        if let Some(i) = passthrough_headers {
            if schema.field(i).data_type() != &crate::source::kafka::headers_type() {
                return Err((
                    "headers",
                    "the `_headers` column must be a Kafka source's headers (list of {key, value})".into(),
                ));
            }
        }
        let value_columns: Vec<usize> = (0..schema.fields().len())
            .filter(|i| {
                Some(*i) != topic_column
                    && !headers.contains(i)
                    && !METADATA_COLUMNS.contains(&schema.field(*i).name().as_str())
            })
            .collect();
        if value_columns.is_empty() {
            return Err(("format", "no column is left for the message value".into()));
        }
        if matches!(config.format, ValueFormat::String | ValueFormat::Bytes) {
            let want = if config.format == ValueFormat::String { DataType::Utf8 } else { DataType::Binary };
            if value_columns.len() != 1 || schema.field(value_columns[0]).data_type() != &want {
                return Err((
                    "format",
                    format!(
                        "`{:?}` values need exactly one {} value column; select it in SQL (e.g. SELECT value FROM ...)",
                        config.format,
                        if want == DataType::Utf8 { "varchar" } else { "bytea" }
                    ),
                ));
            }
        }
        let value_schema = Arc::new(schema.project(&value_columns).map_err(|e| ("format", e.to_string()))?);
        Ok(KafkaSink {
            component: id.to_string(),
            producer: None,
            client_config,
            connection,
            topic,
            topic_column,
            key,
            headers,
            passthrough_headers,
            value_columns,
            value_schema,
            format: config.format,
            dead_letter: DeadLetter::none(),
            metrics,
            in_flight: VecDeque::new(),
        })
    }

    fn producer(&mut self) -> Result<FutureProducer<SinkContext>> {
        if self.producer.is_none() {
            let p = self
                .client_config
                .create_with_context(SinkContext { component: self.component.clone() })
                .map_err(|e| self.error(format!("cannot create the Kafka producer: {e}")))?;
            self.producer = Some(p);
        }
        Ok(self.producer.clone().expect("created above"))
    }

    fn error(&self, message: String) -> Error {
        Error::Service { component: self.component.clone(), message: redact(&message, &self.connection) }
    }

    /// The value of every row, encoded.
    fn values(&self, data: &RecordBatch) -> Result<Vec<Vec<u8>>> {
        let values = RecordBatch::try_new(
            self.value_schema.clone(),
            self.value_columns.iter().map(|i| data.column(*i).clone()).collect(),
        )
        .map_err(|e| self.error(e.to_string()))?;
        let n = values.num_rows();
        let split = |buf: Vec<u8>| -> Vec<Vec<u8>> {
            // One line per row: JSON and CSV writers end each record with '\n' and escape
            // newlines inside values (CSV quotes them, so split on record ends the writer made).
            buf.split_inclusive(|b| *b == b'\n').map(|l| l.strip_suffix(b"\n").unwrap_or(l).to_vec()).collect()
        };
        let out = match self.format {
            ValueFormat::Json => {
                let mut w = arrow::json::LineDelimitedWriter::new(Vec::with_capacity(n * 128));
                w.write(&values).map_err(|e| self.error(e.to_string()))?;
                w.finish().map_err(|e| self.error(e.to_string()))?;
                split(w.into_inner())
            }
            ValueFormat::Csv => {
                // Encoded row by row: a quoted value may hold a newline.
                let mut rows = Vec::with_capacity(n);
                for i in 0..n {
                    let mut w = arrow::csv::WriterBuilder::new().with_header(false).build(Vec::new());
                    w.write(&values.slice(i, 1)).map_err(|e| self.error(e.to_string()))?;
                    let mut b = w.into_inner();
                    if b.last() == Some(&b'\n') {
                        b.pop();
                    }
                    rows.push(b);
                }
                rows
            }
            ValueFormat::String => {
                let col = values.column(0).as_string::<i32>();
                (0..n).map(|i| col.value(i).as_bytes().to_vec()).collect()
            }
            ValueFormat::Bytes => {
                let col = values.column(0).as_binary::<i32>();
                (0..n).map(|i| col.value(i).to_vec()).collect()
            }
        };
        if out.len() != n {
            return Err(self.error(format!("encoded {} values for {n} rows", out.len())));
        }
        Ok(out)
    }

    /// Reaps finished deliveries, and waits for the oldest while too many are outstanding.
    async fn reap(&mut self, wait_for_room: bool) -> Result<()> {
        while let Some(h) = self.in_flight.front() {
            let full = wait_for_room && self.in_flight.len() >= MAX_IN_FLIGHT_BATCHES;
            if !h.is_finished() && !full {
                break;
            }
            let h = self.in_flight.pop_front().expect("front exists");
            h.await.map_err(|e| self.error(e.to_string()))??;
        }
        Ok(())
    }
}

/// The text of every row of `col` (nulls as `None`); binary columns as their bytes.
fn texts(col: &ArrayRef) -> Result<Vec<Option<Vec<u8>>>, String> {
    if let Some(b) = col.as_binary_opt::<i32>() {
        return Ok((0..b.len()).map(|i| b.is_valid(i).then(|| b.value(i).to_vec())).collect());
    }
    let f = ArrayFormatter::try_new(col.as_ref(), &FormatOptions::default()).map_err(|e| e.to_string())?;
    Ok((0..col.len()).map(|i| col.is_valid(i).then(|| f.value(i).to_string().into_bytes())).collect())
}

#[async_trait]
impl Sink for KafkaSink {
    fn set_dead_letter(&mut self, dead_letter: DeadLetter) {
        self.dead_letter = dead_letter;
    }

    async fn write(&mut self, batch: Batch) -> Result<()> {
        self.reap(true).await?;
        let producer = self.producer()?;
        let data = &batch.data;
        let n = data.num_rows();
        let values = self.values(data)?;
        let keys = self.key.map(|k| texts(data.column(k))).transpose().map_err(|e| self.error(e))?;
        let header_values: Vec<(String, Vec<Option<Vec<u8>>>)> = self
            .headers
            .iter()
            .map(|h| Ok((data.schema().field(*h).name().clone(), texts(data.column(*h))?)))
            .collect::<Result<_, String>>()
            .map_err(|e| self.error(e))?;
        let topics = self.topic_column.map(|c| data.column(c).as_string::<i32>().clone());
        let passthrough = self.passthrough_headers.map(|c| data.column(c).as_list::<i32>().clone());
        let mut deliveries = Vec::with_capacity(n);
        let mut bad = Vec::new();
        for (i, value) in values.iter().enumerate() {
            let topic = match (&self.topic, &topics) {
                (Some(t), _) => t.as_str(),
                (None, Some(col)) if col.is_valid(i) => col.value(i),
                _ => {
                    bad.push(BadRecord {
                        position: batch.row_position(i),
                        stage: Stage::Write,
                        error: "the topic column is null".into(),
                        raw: value.clone(),
                        key: keys.as_ref().and_then(|k| k[i].clone()),
                    });
                    continue;
                }
            };
            let mut headers = OwnedHeaders::new();
            let mut any_header = false;
            if let Some(list) = &passthrough {
                if list.is_valid(i) {
                    let items = list.value(i);
                    let items = items.as_struct();
                    let (hk, hv) = (items.column(0).as_string::<i32>(), items.column(1).as_binary::<i32>());
                    for j in 0..items.len() {
                        let v = hv.is_valid(j).then(|| hv.value(j));
                        headers = headers.insert(Header { key: hk.value(j), value: v });
                        any_header = true;
                    }
                }
            }
            for (name, vals) in &header_values {
                headers = headers.insert(Header { key: name, value: vals[i].as_deref() });
                any_header = true;
            }
            let key = keys.as_ref().and_then(|k| k[i].as_deref());
            loop {
                let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(value.as_slice());
                if let Some(k) = key {
                    record = record.key(k);
                }
                if any_header {
                    record = record.headers(headers.clone());
                }
                match producer.send_result(record) {
                    Ok(f) => {
                        deliveries.push((i, f));
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        _,
                    )) => {
                        // The producer's queue is full: wait for deliveries to make room.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        bad.push(BadRecord {
                            position: batch.row_position(i),
                            stage: Stage::Write,
                            error: redact(&format!("Kafka refused the message: {e}"), &self.connection),
                            raw: value.clone(),
                            key: key.map(<[u8]>::to_vec),
                        });
                        break;
                    }
                }
            }
        }
        let dead_letter = self.dead_letter.clone();
        let metrics = self.metrics.clone();
        let connection = self.connection.clone();
        let produced = metrics::counter!(names::KAFKA_PRODUCED_RECORDS_TOTAL, "component" => self.component.clone());
        let failed = metrics::counter!(names::KAFKA_DELIVERY_ERRORS_TOTAL, "component" => self.component.clone());
        // Deliveries complete in the background; the batch (and its ack) is held until then.
        let handle = tokio::spawn(async move {
            let mut ok = 0u64;
            for (i, f) in deliveries {
                match f.await {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err((e, _))) => bad.push(BadRecord {
                        position: batch.row_position(i),
                        stage: Stage::Write,
                        error: redact(&format!("delivery failed after retries: {e}"), &connection),
                        raw: values[i].clone(),
                        key: keys.as_ref().and_then(|k| k[i].clone()),
                    }),
                    Err(_) => bad.push(BadRecord {
                        position: batch.row_position(i),
                        stage: Stage::Write,
                        error: "the producer closed before the message was delivered".into(),
                        raw: values[i].clone(),
                        key: keys.as_ref().and_then(|k| k[i].clone()),
                    }),
                }
            }
            produced.increment(ok);
            if !bad.is_empty() {
                failed.increment(bad.len() as u64);
                bad.sort_by_key(|b| b.position);
                dead_letter.send(&metrics, &batch.shard, &batch.ack, bad).await?;
            }
            drop(batch);
            Ok(())
        });
        self.in_flight.push_back(handle);
        Ok(())
    }

    async fn tick(&mut self) -> Result<()> {
        self.reap(false).await
    }

    async fn finish(&mut self) -> Result<()> {
        while let Some(h) = self.in_flight.pop_front() {
            h.await.map_err(|e| self.error(e.to_string()))??;
        }
        let Some(producer) = self.producer.clone() else { return Ok(()) };
        let r = crate::sink::blocking(|| producer.flush(FLUSH_TIMEOUT));
        r.map_err(|e| self.error(format!("flushing the producer failed: {e}")))
    }

    async fn abort(&mut self) {
        for h in self.in_flight.drain(..) {
            h.abort();
        }
    }
}
