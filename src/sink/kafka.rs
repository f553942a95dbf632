//! The `kafka` sink: each row becomes one message (JSON or CSV value, a key column, headers), sent
//! by an idempotent producer. A batch's ack is dropped only when every message of it is delivered
//! (acknowledged by the brokers) or, after librdkafka's retries, dead-lettered with the error.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use indexmap::IndexMap;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use serde::Deserialize;
use tokio::task::JoinHandle;

use super::Sink;
use crate::batch::Batch;
use crate::config::HumanDuration;
use crate::dead_letter::{BadRecord, DeadLetter, Stage};
use crate::kafka::{redact, Connection, SaslConfig, TlsConfig};
use crate::observe::{names, ComponentMetrics};
use crate::{Error, Result};

/// Longest `finish` waits for outstanding deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Batches whose deliveries may be outstanding at once (and batches per transaction).
const MAX_IN_FLIGHT_BATCHES: usize = 64;
/// Rows per transaction, at most.
const MAX_TRANSACTION_ROWS: usize = 500_000;
/// Default `transaction_interval`.
pub const DEFAULT_TRANSACTION_INTERVAL: Duration = Duration::from_secs(1);
/// Longest one transaction call (init, commit, abort) may take.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Tries of one transaction (a try that fails is aborted and its messages sent again).
const TRANSACTION_ATTEMPTS: u32 = 5;

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
    /// Sends through Kafka transactions under this id: the messages of a transaction become
    /// visible to `read_committed` consumers together, and a crashed run's open transaction is
    /// aborted when the next run with the same id starts. Unique per running sink.
    pub transactional_id: Option<String>,
    /// With `transactional_id`: longest a transaction stays open (default 1s).
    pub transaction_interval: Option<HumanDuration>,
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
    /// With `transactional_id`: the open transaction.
    transaction: Option<Transaction>,
}

/// The messages of one batch handed to the producer, their deliveries outstanding.
struct Sent {
    batch: Batch,
    deliveries: Vec<(usize, DeliveryFuture)>,
    /// Rows the destination refused for their own sake: dead-lettered once the batch is settled.
    bad: Vec<BadRecord>,
    /// The row indices of `bad`.
    refused: HashSet<usize>,
    /// Rows delivered (in the current try of a transaction).
    delivered: Vec<usize>,
    values: Vec<Vec<u8>>,
    keys: Option<Vec<Option<Vec<u8>>>>,
}

impl Sent {
    fn failed(&self, i: usize, error: Option<&KafkaError>, connection: &Connection) -> BadRecord {
        BadRecord {
            position: self.batch.row_position(i),
            stage: Stage::Write,
            error: match error {
                Some(e) => redact(&format!("delivery failed after retries: {e}"), connection),
                None => "the producer closed before the message was delivered".into(),
            },
            raw: self.values[i].clone(),
            key: self.keys.as_ref().and_then(|k| k[i].clone()),
        }
    }

    /// Waits for every outstanding delivery; returns the failed rows with their errors.
    async fn settle(&mut self) -> Vec<(usize, Option<KafkaError>)> {
        let mut failed = Vec::new();
        for (i, f) in std::mem::take(&mut self.deliveries) {
            match f.await {
                Ok(Ok(_)) => self.delivered.push(i),
                Ok(Err((e, _))) => failed.push((i, Some(e))),
                Err(_) => failed.push((i, None)),
            }
        }
        failed
    }
}

/// The open transaction of a sink with `transactional_id`. Its batches (and their acks) are held
/// until it commits.
struct Transaction {
    id: String,
    interval: Duration,
    /// When the open transaction began; `None` while none is open.
    began: Option<Instant>,
    open: Vec<Sent>,
    rows: usize,
}

/// Whether a failed delivery is the message's own fault (sending it again fails the same way).
fn refused_for_its_own_sake(error: Option<&KafkaError>) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        error.and_then(KafkaError::rdkafka_error_code),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::UnknownTopic
                | C::UnknownPartition
                | C::TopicAuthorizationFailed
        )
    )
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
        let mut settings = vec![
            ("enable.idempotence", idempotent),
            ("compression.type", &compression),
            ("linger.ms", "20"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.kbytes", "65536"),
        ];
        let transaction = match &config.transactional_id {
            None if config.transaction_interval.is_some() => {
                return Err(("transaction_interval", "applies only with `transactional_id`".into()))
            }
            None => None,
            Some(id) if id.trim().is_empty() => {
                return Err((
                    "transactional_id",
                    "is empty; name the sink's transactions, e.g. \"orders-${HOSTNAME}\"".into(),
                ))
            }
            Some(_) if !config.idempotent => {
                return Err((
                    "idempotent",
                    "transactions need the idempotent producer: remove `idempotent = false`".into(),
                ))
            }
            Some(id) => Some(Transaction {
                id: id.clone(),
                interval: config.transaction_interval.map_or(DEFAULT_TRANSACTION_INTERVAL, |d| d.0),
                began: None,
                open: Vec::new(),
                rows: 0,
            }),
        };
        if let Some(t) = &transaction {
            settings.push(("transactional.id", &t.id));
        }
        let client_config = connection.client_config(&settings)?;
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
            transaction,
        })
    }

    fn producer(&mut self) -> Result<FutureProducer<SinkContext>> {
        if self.producer.is_none() {
            let p: FutureProducer<SinkContext> = self
                .client_config
                .create_with_context(SinkContext { component: self.component.clone() })
                .map_err(|e| self.error(format!("cannot create the Kafka producer: {e}")))?;
            if self.transaction.is_some() {
                // Fences an earlier producer with the same id and aborts its open transaction.
                crate::sink::blocking(|| p.init_transactions(TRANSACTION_TIMEOUT))
                    .map_err(|e| self.transaction_error("starting transactions", &e))?;
            }
            self.producer = Some(p);
        }
        Ok(self.producer.clone().expect("created above"))
    }

    /// A failed transaction call, explained.
    fn transaction_error(&self, doing: &str, e: &KafkaError) -> Error {
        let id = self.transaction.as_ref().map_or("", |t| t.id.as_str());
        let hint = match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnsupportedFeature) => format!(
                "; the brokers at {} do not support Kafka transactions (KIP-98): remove `transactional_id`",
                self.connection.brokers
            ),
            Some(
                RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::TransactionCoordinatorFenced,
            ) => format!(
                "; another producer with transactional_id `{id}` took over: each running sink needs its own id \
                 (e.g. \"{id}-${{HOSTNAME}}\")"
            ),
            _ => String::new(),
        };
        self.error(format!("{doing} (transactional_id `{id}`) failed: {e}{hint}"))
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

    /// Hands the rows of `batch` (all, or those in `only`) to the producer.
    async fn send(&self, producer: &FutureProducer<SinkContext>, batch: Batch, only: Option<&[usize]>) -> Result<Sent> {
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
        let rows: Vec<usize> = only.map_or_else(|| (0..n).collect(), <[usize]>::to_vec);
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut bad = Vec::new();
        let mut refused = HashSet::new();
        for i in rows {
            let value = &values[i];
            let key = keys.as_ref().and_then(|k| k[i].as_deref());
            let topic = match (&self.topic, &topics) {
                (Some(t), _) => t.as_str(),
                (None, Some(col)) if col.is_valid(i) => col.value(i),
                _ => {
                    refused.insert(i);
                    bad.push(BadRecord {
                        position: batch.row_position(i),
                        stage: Stage::Write,
                        error: "the topic column is null".into(),
                        raw: value.clone(),
                        key: key.map(<[u8]>::to_vec),
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
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // The producer's queue is full: wait for deliveries to make room.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        refused.insert(i);
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
        Ok(Sent { batch, deliveries, bad, refused, delivered: Vec::new(), values, keys })
    }

    /// Commits the open transaction, if any: settles its deliveries, commits, then releases its
    /// batches (their acks) and dead-letters the rows refused for their own sake. A try that fails
    /// (a failed delivery, an abortable commit) is aborted and its other rows are sent again in a
    /// new transaction, up to [`TRANSACTION_ATTEMPTS`] tries.
    async fn commit(&mut self) -> Result<()> {
        let Some(t) = self.transaction.as_mut() else { return Ok(()) };
        if t.began.is_none() {
            return Ok(());
        }
        let mut open = std::mem::take(&mut t.open);
        t.rows = 0;
        let result = self.try_commit(&mut open).await;
        if result.is_err() {
            // Nothing of a failed transaction counts as delivered: its batches are read again.
            for sent in open {
                sent.batch.ack.clone().abandon();
            }
        }
        result
    }

    async fn try_commit(&mut self, open: &mut Vec<Sent>) -> Result<()> {
        let producer = self.producer()?;
        let mut last = String::new();
        for attempt in 1..=TRANSACTION_ATTEMPTS {
            let mut failed_any = false;
            for sent in open.iter_mut() {
                for (i, e) in sent.settle().await {
                    failed_any = true;
                    if refused_for_its_own_sake(e.as_ref()) {
                        let record = sent.failed(i, e.as_ref(), &self.connection);
                        sent.bad.push(record);
                        sent.refused.insert(i);
                    } else {
                        last = e.map_or_else(|| "the producer closed".into(), |e| e.to_string());
                    }
                }
            }
            if !failed_any {
                let commit = || crate::sink::blocking(|| producer.commit_transaction(TRANSACTION_TIMEOUT));
                let mut result = commit();
                // A retriable failure leaves the commit call in progress: it is repeated, not aborted.
                let mut retries = 0;
                while let Err(KafkaError::Transaction(e)) = &result {
                    if !e.is_retriable()
                        || e.code() == RDKafkaErrorCode::UnsupportedFeature
                        || retries == TRANSACTION_ATTEMPTS
                    {
                        break;
                    }
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(retries))).await;
                    result = commit();
                }
                match result {
                    Ok(()) => return self.committed(open).await,
                    Err(KafkaError::Transaction(e))
                        if e.txn_requires_abort()
                            && !e.is_fatal()
                            && e.code() != RDKafkaErrorCode::UnsupportedFeature =>
                    {
                        last = e.to_string();
                    }
                    Err(e) => return Err(self.transaction_error("committing the transaction", &e)),
                }
            }
            tracing::warn!(
                component = %self.component,
                "transaction try {attempt} of {TRANSACTION_ATTEMPTS} failed ({}); aborting it and sending its messages again",
                redact(&last, &self.connection)
            );
            crate::sink::blocking(|| producer.abort_transaction(TRANSACTION_TIMEOUT))
                .map_err(|e| self.transaction_error("aborting a failed transaction", &e))?;
            if attempt == TRANSACTION_ATTEMPTS {
                break;
            }
            producer.begin_transaction().map_err(|e| self.transaction_error("beginning a transaction", &e))?;
            for sent in open.iter_mut() {
                let rows: Vec<usize> = (0..sent.batch.data.num_rows()).filter(|i| !sent.refused.contains(i)).collect();
                let resent = self.send(&producer, sent.batch.clone(), Some(&rows)).await?;
                sent.deliveries = resent.deliveries;
                sent.delivered.clear();
                sent.bad.extend(resent.bad);
                sent.refused.extend(resent.refused);
            }
        }
        Err(self.error(format!(
            "gave up on a transaction after {TRANSACTION_ATTEMPTS} tries (last: {}); nothing of it is committed",
            redact(&last, &self.connection)
        )))
    }

    /// After a commit: counts, dead-letters what was refused, and releases the batches.
    async fn committed(&mut self, open: &mut Vec<Sent>) -> Result<()> {
        let produced = metrics::counter!(names::KAFKA_PRODUCED_RECORDS_TOTAL, "component" => self.component.clone());
        let failed = metrics::counter!(names::KAFKA_DELIVERY_ERRORS_TOTAL, "component" => self.component.clone());
        metrics::counter!(names::KAFKA_TRANSACTIONS_TOTAL, "component" => self.component.clone()).increment(1);
        for sent in open.iter_mut() {
            produced.increment(sent.delivered.len() as u64);
            if !sent.bad.is_empty() {
                failed.increment(sent.bad.len() as u64);
                sent.bad.sort_by_key(|b| b.position);
                let bad = std::mem::take(&mut sent.bad);
                self.dead_letter.send(&self.metrics, &sent.batch.shard, &sent.batch.ack, bad).await?;
            }
        }
        open.clear();
        if let Some(t) = self.transaction.as_mut() {
            t.began = None;
        }
        Ok(())
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
        if self.transaction.is_some() {
            return self.write_transactional(batch).await;
        }
        self.reap(true).await?;
        let producer = self.producer()?;
        let mut sent = self.send(&producer, batch, None).await?;
        let dead_letter = self.dead_letter.clone();
        let metrics = self.metrics.clone();
        let connection = self.connection.clone();
        let produced = metrics::counter!(names::KAFKA_PRODUCED_RECORDS_TOTAL, "component" => self.component.clone());
        let failed = metrics::counter!(names::KAFKA_DELIVERY_ERRORS_TOTAL, "component" => self.component.clone());
        // Deliveries complete in the background; the batch (and its ack) is held until then.
        let handle = tokio::spawn(async move {
            for (i, e) in sent.settle().await {
                let record = sent.failed(i, e.as_ref(), &connection);
                sent.bad.push(record);
            }
            produced.increment(sent.delivered.len() as u64);
            if !sent.bad.is_empty() {
                failed.increment(sent.bad.len() as u64);
                let mut bad = std::mem::take(&mut sent.bad);
                bad.sort_by_key(|b| b.position);
                if let Err(e) = dead_letter.send(&metrics, &sent.batch.shard, &sent.batch.ack, bad).await {
                    // Not delivered after all: the batch is read again.
                    sent.batch.ack.clone().abandon();
                    return Err(e);
                }
            }
            drop(sent);
            Ok(())
        });
        self.in_flight.push_back(handle);
        Ok(())
    }

    async fn tick(&mut self) -> Result<()> {
        if let Some(t) = &self.transaction {
            if t.began.is_some_and(|b| b.elapsed() >= t.interval) {
                self.commit().await?;
            }
            return Ok(());
        }
        self.reap(false).await
    }

    async fn finish(&mut self) -> Result<()> {
        self.commit().await?;
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
        let open = self.transaction.as_mut().is_some_and(|t| {
            t.open.drain(..).for_each(|sent| sent.batch.ack.clone().abandon());
            t.began.take().is_some()
        });
        if let (true, Some(p)) = (open, &self.producer) {
            // Best effort: a transaction left open is aborted by the broker after its timeout, or
            // by the next producer with the same id.
            if let Err(e) = crate::sink::blocking(|| p.abort_transaction(Duration::from_secs(10))) {
                tracing::warn!(component = %self.component, "aborting the open transaction failed: {}", redact(&e.to_string(), &self.connection));
            }
        }
    }
}

impl KafkaSink {
    /// `write` under `transactional_id`: the batch joins the open transaction (beginning one if
    /// none is open), which commits when it is full or at the latest after `transaction_interval`.
    async fn write_transactional(&mut self, batch: Batch) -> Result<()> {
        let producer = self.producer()?;
        let t = self.transaction.as_ref().expect("transactional");
        if t.began.is_none() {
            producer.begin_transaction().map_err(|e| self.transaction_error("beginning a transaction", &e))?;
        }
        let rows = batch.data.num_rows();
        let sent = self.send(&producer, batch, None).await?;
        let t = self.transaction.as_mut().expect("transactional");
        t.began.get_or_insert_with(Instant::now);
        t.open.push(sent);
        t.rows += rows;
        if t.open.len() >= MAX_IN_FLIGHT_BATCHES || t.rows >= MAX_TRANSACTION_ROWS {
            self.commit().await?;
        }
        Ok(())
    }
}
