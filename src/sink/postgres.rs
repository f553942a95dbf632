//! The `postgres` sink: rows are encoded straight from Arrow arrays into PostgreSQL's binary COPY
//! format and written in one transaction per flush, either into the table (`insert`) or into a
//! staging table merged with `INSERT … ON CONFLICT … DO UPDATE` (`upsert`). With `exactly_once`,
//! each shard's last position is stored in `sluice_offsets` in the same transaction, and rows at or
//! before it are skipped when they are read again.
//!
//! A flush that the server refuses because of some rows (a constraint, a value out of range) is
//! bisected inside the transaction with savepoints: the rows at fault go to the dead-letter sink
//! with the server's message, the others are written. Lost connections, server restarts,
//! serialization failures and deadlocks are retried on a fresh connection with backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, SchemaRef, TimeUnit};
use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::Pool;
use futures::SinkExt;
use serde::Deserialize;
use tokio::task::JoinHandle;

use super::Sink;
use crate::batch::Batch;
use crate::config::{ByteSize, HumanDuration};
use crate::dead_letter::{BadRecord, DeadLetter, Stage};
use crate::observe::{names, ComponentMetrics};
use crate::postgres::{self as pg, PgColumn, PgKind, TlsSettings};
use crate::transform::row_as_json;
use crate::{Error, Result};

/// Rows per flush (one transaction) when nothing says otherwise.
pub const DEFAULT_BATCH_ROWS: usize = 200_000;
/// Encoded bytes per flush.
pub const DEFAULT_BATCH_BYTES: ByteSize = ByteSize(32 << 20);
/// Longest rows wait in the sink before they are flushed.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts of a flush that fails for a transient reason.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Table of exactly-once positions.
pub const DEFAULT_OFFSETS_TABLE: &str = "sluice_offsets";
/// Exactly-once: shards whose stored positions are kept in memory before the idle ones are
/// forgotten (and read again if they come back).
const CACHED_SHARDS: usize = 4096;
/// Metadata columns a Kafka source adds; left out when the table has no such column.
const METADATA_COLUMNS: &[&str] = &["_key", "_topic", "_partition", "_offset", "_timestamp", "_headers"];
/// The staging table's row-order column (upsert keeps the last row of each key).
const SEQ_COLUMN: &str = "_sluice_seq";
/// COPY data is streamed in chunks of this size.
const COPY_CHUNK: usize = 1 << 20;

/// `[sinks.ID] type = "postgres"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    #[serde(default)]
    pub inputs: Vec<String>,
    /// `postgres://user:password@host:5432/database` (use `${VAR}`); `?sslmode=require` for TLS.
    pub url: String,
    /// Target table, `table` or `schema.table`.
    pub table: String,
    /// `insert` (COPY into the table) or `upsert` (COPY into a staging table, then merge on `key`).
    #[serde(default)]
    pub mode: WriteMode,
    /// The conflict key of `upsert`: columns with a unique constraint or primary key.
    #[serde(default)]
    pub key: Vec<String>,
    /// Create the table from the input's columns when it does not exist (with `key` as primary
    /// key in upsert mode).
    #[serde(default)]
    pub create_table: bool,
    /// Store each shard's position in `offsets_table` in the same transaction as the rows, and
    /// skip rows at or before it when they come again: each record lands once.
    #[serde(default)]
    pub exactly_once: bool,
    /// Table of the exactly-once positions (default `sluice_offsets`, created when missing).
    pub offsets_table: Option<String>,
    /// Rows per transaction (default 200000).
    pub batch_rows: Option<usize>,
    /// Encoded bytes per transaction (default 32MiB).
    pub batch_bytes: Option<ByteSize>,
    /// Longest rows wait before they are written (default 1s).
    pub flush_interval: Option<HumanDuration>,
    /// Attempts of a transaction that fails for a transient reason (default 10).
    pub max_attempts: Option<u32>,
    /// TLS settings beyond the URL's `sslmode`.
    #[serde(default)]
    pub tls: TlsSettings,
}

/// `mode = "insert" | "upsert"`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    #[default]
    Insert,
    Upsert,
}

/// Everything fixed once the table has been looked at.
struct Plan {
    component: String,
    pipeline: String,
    target: String,
    /// Input column index and the table column's kind, for each column written.
    columns: Vec<(usize, PgKind)>,
    /// `COPY … FROM STDIN (FORMAT binary)` into the table (insert) or the staging table (upsert).
    copy: String,
    /// Upsert: creates the session's staging table.
    stage_ddl: Option<String>,
    /// Upsert: merges staged rows `$1 ..= $2` (by sequence) into the table.
    merge: Option<String>,
    offsets_table: Option<String>,
    max_attempts: u32,
}

/// Rows encoded and waiting for a flush, with the batches they came from.
#[derive(Default)]
struct Pending {
    /// Binary COPY tuples, one after another (no header or trailer).
    data: Vec<u8>,
    /// `data`, frozen when the flush starts (sliced for COPY without copying).
    frozen: Bytes,
    /// End offset in `data` of each row.
    row_ends: Vec<usize>,
    /// (index into `batches`, row in that batch) of each row.
    rows: Vec<(u32, u32)>,
    batches: Vec<Batch>,
    /// Exactly-once: each shard's last position in these batches.
    positions: HashMap<String, u64>,
    since: Option<Instant>,
}

/// Writes rows to a PostgreSQL table.
pub struct PostgresSink {
    component: String,
    pipeline: String,
    config: PostgresSinkConfig,
    schema: SchemaRef,
    target: String,
    describe: String,
    pool: Pool,
    plan: Option<Arc<Plan>>,
    pending: Pending,
    in_flight: Option<JoinHandle<Result<HashMap<String, u64>>>>,
    /// Exactly-once: the stored position of each shard written lately (`None`: the table has
    /// none), read when the shard's first batch arrives; at most about [`CACHED_SHARDS`].
    committed: HashMap<String, Option<u64>>,
    /// Worker mode: shards whose row in the offsets table carries this worker's epoch.
    claimed: std::collections::HashSet<String>,
    dead_letter: DeadLetter,
    metrics: ComponentMetrics,
    batch_rows: usize,
    batch_bytes: usize,
    flush_interval: Duration,
}

impl PostgresSink {
    /// Checks the settings; connects nothing (the table is looked at before the first write).
    ///
    /// # Errors
    /// `(key, message)` naming the setting at fault.
    pub fn new(
        id: &str,
        pipeline: &str,
        config: &PostgresSinkConfig,
        schema: &SchemaRef,
        metrics: ComponentMetrics,
    ) -> Result<Self, (&'static str, String)> {
        let pg_config = pg::parse_url(&config.url).map_err(|e| ("url", e))?;
        let describe = pg::describe_target(&pg_config);
        let (_, _, target) = pg::quote_table(&config.table).map_err(|e| ("table", e))?;
        if let Some(t) = &config.offsets_table {
            pg::quote_table(t).map_err(|e| ("offsets_table", e))?;
        }
        match config.mode {
            WriteMode::Upsert if config.key.is_empty() => {
                return Err(("key", "upsert needs the conflict key: key = [\"id\"]".into()));
            }
            WriteMode::Insert if !config.key.is_empty() && !config.create_table => {
                return Err(("key", "`key` is for mode = \"upsert\" (or the primary key of create_table)".into()));
            }
            _ => {}
        }
        for k in &config.key {
            if schema.index_of(k).is_err() {
                let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(("key", format!("column `{k}` is not in the sink's input; it has: {}", have.join(", "))));
            }
        }
        if config.create_table {
            for f in schema.fields() {
                if PgKind::sql_for_arrow(f.data_type()).is_none() {
                    return Err((
                        "create_table",
                        format!(
                            "column `{}` ({}) has no PostgreSQL type; cast it in SQL first",
                            f.name(),
                            crate::config::types::sql_type_name(f.data_type())
                        ),
                    ));
                }
            }
        }
        let batch_rows = config.batch_rows.unwrap_or(DEFAULT_BATCH_ROWS);
        if batch_rows == 0 {
            return Err(("batch_rows", "must be at least 1".into()));
        }
        let batch_bytes = config.batch_bytes.unwrap_or(DEFAULT_BATCH_BYTES).0 as usize;
        if batch_bytes == 0 {
            return Err(("batch_bytes", "must be more than 0".into()));
        }
        if config.max_attempts == Some(0) {
            return Err(("max_attempts", "must be at least 1".into()));
        }
        let pool = pg::pool(pg_config, &config.tls, 2).map_err(|e| ("tls", e))?;
        Ok(PostgresSink {
            component: id.to_string(),
            pipeline: pipeline.to_string(),
            config: config.clone(),
            schema: schema.clone(),
            target,
            describe,
            pool,
            plan: None,
            pending: Pending::default(),
            in_flight: None,
            committed: HashMap::new(),
            claimed: Default::default(),
            dead_letter: DeadLetter::none(),
            metrics,
            batch_rows,
            batch_bytes,
            flush_interval: config.flush_interval.map_or(DEFAULT_FLUSH_INTERVAL, |d| d.0),
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Service { component: self.component.clone(), message: message.into() }
    }

    fn db_error(&self, what: &str, e: &tokio_postgres::Error) -> Error {
        self.error(format!("{what} on {} table {}: {}", self.describe, self.target, pg::message(e)))
    }

    /// Looks at the table (creating it if asked), checks every column, and loads the stored
    /// positions: all before the first row is written. A connection lost meanwhile (a restart,
    /// a terminated backend) is tried again on a fresh one, as writes are; every step can be run
    /// twice.
    async fn prepare(&mut self) -> Result<Arc<Plan>> {
        if let Some(p) = &self.plan {
            return Ok(p.clone());
        }
        let mut attempt = 1;
        loop {
            match self.prepare_once().await {
                Ok(plan) => return Ok(plan),
                Err(Prep { error, transient }) => {
                    let what = format!("preparing {}", self.target);
                    if !transient || !self.retry_after(&mut attempt, &what, &error).await {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// After transient failure number `attempt` of `what`: counts the retry, logs it, waits and
    /// says `true`; `false` once `max_attempts` are spent.
    async fn retry_after(&self, attempt: &mut u32, what: &str, error: &(dyn std::fmt::Display + Sync)) -> bool {
        if *attempt >= self.config.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS) {
            return false;
        }
        let wait = pg::backoff(*attempt);
        metrics::counter!(names::POSTGRES_RETRIES_TOTAL, "component" => self.component.clone()).increment(1);
        tracing::warn!(component = %self.component, attempt = *attempt, "{what} failed, retrying in {wait:?}: {error}");
        tokio::time::sleep(wait).await;
        *attempt += 1;
        true
    }

    /// A database error of [`prepare_once`](Self::prepare_once), transient or not.
    fn db_prep(&self, what: &str, e: &tokio_postgres::Error) -> Prep {
        Prep { error: self.db_error(what, e), transient: pg::is_transient(e) }
    }

    async fn prepare_once(&mut self) -> Result<Arc<Plan>, Prep> {
        let client = self.pool.get().await.map_err(|e| self.error(pg::pool_error(&e, &self.describe)))?;
        let mut table =
            pg::table_columns(&client, &self.target).await.map_err(|e| self.db_prep("reading the columns", &e))?;
        if table.is_none() && self.config.create_table {
            let ddl = self.create_table_sql();
            client.batch_execute(&ddl).await.map_err(|e| self.db_prep("creating the table", &e))?;
            tracing::info!(component = %self.component, table = %self.target, "created the table");
            table =
                pg::table_columns(&client, &self.target).await.map_err(|e| self.db_prep("reading the columns", &e))?;
        }
        let Some(table) = table else {
            return Err(self
                .error(format!(
                    "table {} does not exist in {}; create it, or set create_table = true",
                    self.target, self.describe
                ))
                .into());
        };
        let columns =
            plan_columns(&self.schema, &table).map_err(|e| self.error(format!("table {}: {e}", self.target)))?;
        if self.config.mode == WriteMode::Upsert {
            // DISTINCT ON treats null keys as equal where a unique constraint does not: rows
            // with a null key would be merged away unseen.
            if let Some(c) = table.iter().find(|c| self.config.key.contains(&c.name) && !c.not_null) {
                return Err(self
                    .error(format!(
                        "upsert key column `{}` of {} may be null; make it NOT NULL (a primary key is)",
                        c.name, self.target
                    ))
                    .into());
            }
        }
        let names: Vec<String> = columns.iter().map(|(i, _)| pg::quote_ident(self.schema.field(*i).name())).collect();
        let list = names.join(", ");
        let (copy, stage_ddl, merge) = match self.config.mode {
            WriteMode::Insert => (format!("COPY {} ({list}) FROM STDIN (FORMAT binary)", self.target), None, None),
            WriteMode::Upsert => {
                let stage = pg::quote_ident(&format!("sluice_stage_{}", self.component));
                let seq = pg::quote_ident(SEQ_COLUMN);
                let ddl = format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS \
                     SELECT {list}, NULL::bigint AS {seq} FROM {} WITH NO DATA",
                    self.target
                );
                let keys: Vec<String> = self.config.key.iter().map(|k| pg::quote_ident(k)).collect();
                let keys = keys.join(", ");
                let updates: Vec<String> = columns
                    .iter()
                    .map(|(i, _)| self.schema.field(*i).name())
                    .filter(|n| !self.config.key.contains(n))
                    .map(|n| format!("{0} = EXCLUDED.{0}", pg::quote_ident(n)))
                    .collect();
                let action = if updates.is_empty() {
                    "DO NOTHING".to_string()
                } else {
                    format!("DO UPDATE SET {}", updates.join(", "))
                };
                let merge = format!(
                    "INSERT INTO {} ({list}) SELECT DISTINCT ON ({keys}) {list} FROM {stage} \
                     WHERE {seq} BETWEEN $1 AND $2 ORDER BY {keys}, {seq} DESC ON CONFLICT ({keys}) {action}",
                    self.target
                );
                (format!("COPY {stage} ({list}, {seq}) FROM STDIN (FORMAT binary)"), Some(ddl), Some(merge))
            }
        };
        if let (Some(ddl), Some(merge)) = (&stage_ddl, &merge) {
            // Plans the merge once, so a key without a unique constraint is found now.
            let check = async {
                client.batch_execute("BEGIN").await?;
                client.batch_execute(ddl).await?;
                let explain = format!("EXPLAIN {merge}");
                client.query(explain.as_str(), &[&0i64, &0i64]).await?;
                Ok::<_, tokio_postgres::Error>(())
            }
            .await;
            let _ = client.batch_execute("ROLLBACK").await;
            check.map_err(|e| {
                if pg::is_transient(&e) {
                    return self.db_prep("checking the upsert", &e);
                }
                Prep::from(self.error(format!(
                    "upsert into {} on key ({}) cannot work: {} (the key needs a primary key or unique constraint)",
                    self.target,
                    self.config.key.join(", "),
                    pg::message(&e)
                )))
            })?;
        }
        let offsets_table = if self.config.exactly_once {
            let (_, _, t) = pg::quote_table(self.config.offsets_table.as_deref().unwrap_or(DEFAULT_OFFSETS_TABLE))
                .map_err(|e| self.error(e))?;
            pg::ensure_table(
                &client,
                &t,
                "pipeline text NOT NULL, sink text NOT NULL, shard text NOT NULL, position bigint NOT NULL, \
                 updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, sink, shard)",
                "epoch bigint NOT NULL DEFAULT 0",
            )
            .await
            .map_err(|e| self.db_prep("creating the offsets table", &e))?;
            Some(t)
        } else {
            None
        };
        let plan = Arc::new(Plan {
            component: self.component.clone(),
            pipeline: self.pipeline.clone(),
            target: self.target.clone(),
            columns,
            copy,
            stage_ddl,
            merge,
            offsets_table,
            max_attempts: self.config.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        });
        self.plan = Some(plan.clone());
        Ok(plan)
    }

    /// Worker mode, exactly-once: writes this worker's epoch into the shard's row of the offsets
    /// table before its first write, then reads the position again. From then on a former owner
    /// that wakes up (a zombie) cannot commit: its epoch is older. Positions read after the claim
    /// are final, so the rows it skips are exactly those already committed.
    async fn claim(&mut self, plan: &Plan, batch: &Batch, key: &str) -> Result<()> {
        let Some(t) = &plan.offsets_table else { return Ok(()) };
        let epoch = match crate::fence::check(&batch.shard) {
            Ok(e) => e.unwrap_or(0) as i64,
            Err(why) => return Err(Error::Fenced { component: self.component.clone(), message: why }),
        };
        let client = self.pool.get().await.map_err(|e| self.error(pg::pool_error(&e, &self.describe)))?;
        client
            .execute(
                &format!(
                    "INSERT INTO {t} AS o (pipeline, sink, shard, position, epoch) VALUES ($1, $2, $3, -1, $4) \
                     ON CONFLICT (pipeline, sink, shard) DO UPDATE SET epoch = EXCLUDED.epoch, updated_at = now() \
                     WHERE o.epoch < EXCLUDED.epoch"
                ),
                &[&self.pipeline, &self.component, &key, &epoch],
            )
            .await
            .map_err(|e| self.db_error("claiming the shard's epoch", &e))?;
        let row = client
            .query_one(
                &format!("SELECT position, epoch FROM {t} WHERE pipeline = $1 AND sink = $2 AND shard = $3"),
                &[&self.pipeline, &self.component, &key],
            )
            .await
            .map_err(|e| self.db_error("reading the claimed position", &e))?;
        let (position, stored): (i64, i64) = (row.get(0), row.get(1));
        if stored > epoch {
            return Err(Error::Fenced {
                component: self.component.clone(),
                message: format!("{t} holds a newer epoch for {key} (another worker owns it now)"),
            });
        }
        // -1: claimed before anything was written.
        self.committed.insert(key.to_string(), u64::try_from(position).ok());
        self.claimed.insert(key.to_string());
        Ok(())
    }

    /// Exactly-once: the stored position of shard `key` in offsets table `t`, read unless it is
    /// known. The table keeps a row for every shard ever written (every S3 object, say); reading
    /// them all at the start made memory and start-up time grow with that history.
    async fn look_up(&mut self, t: &str, key: &str) -> Result<Option<u64>> {
        if let Some(&known) = self.committed.get(key) {
            return Ok(known);
        }
        self.forget_idle_shards();
        let sql = format!("SELECT position FROM {t} WHERE pipeline = $1 AND sink = $2 AND shard = $3");
        let mut attempt = 1;
        let row = loop {
            let read = {
                let client = self.pool.get().await.map_err(|e| self.error(pg::pool_error(&e, &self.describe)))?;
                client.query_opt(&sql, &[&self.pipeline, &self.component, &key]).await
            };
            match read {
                Ok(row) => break row,
                Err(e) => {
                    let what = format!("reading the stored position of {key}");
                    if !pg::is_transient(&e) || !self.retry_after(&mut attempt, &what, &pg::message(&e)).await {
                        return Err(self.db_error("reading the shard's stored position", &e));
                    }
                }
            }
        };
        let stored = row.and_then(|r| u64::try_from(r.get::<_, i64>(0)).ok());
        self.committed.insert(key.to_string(), stored);
        Ok(stored)
    }

    /// Past [`CACHED_SHARDS`] known positions, keeps only those of shards with rows pending.
    /// Safe at any time: a shard's rows arrive in position order, so a position read again from
    /// the table (older, while a transaction of it is in flight) skips no row that is not
    /// already written; a shard claimed again in worker mode keeps its epoch.
    fn forget_idle_shards(&mut self) {
        if self.committed.len() < CACHED_SHARDS && self.claimed.len() < CACHED_SHARDS {
            return;
        }
        let pending = &self.pending.positions;
        self.committed.retain(|k, _| pending.contains_key(k));
        self.claimed.retain(|k| pending.contains_key(k));
    }

    fn create_table_sql(&self) -> String {
        let mut cols: Vec<String> = self
            .schema
            .fields()
            .iter()
            .filter(|f| !METADATA_COLUMNS.contains(&f.name().as_str()))
            .map(|f| {
                let ty = PgKind::sql_for_arrow(f.data_type()).unwrap_or_else(|| "text".into());
                let nn = if f.is_nullable() && !self.config.key.contains(f.name()) { "" } else { " NOT NULL" };
                format!("{} {ty}{nn}", pg::quote_ident(f.name()))
            })
            .collect();
        if !self.config.key.is_empty() {
            let keys: Vec<String> = self.config.key.iter().map(|k| pg::quote_ident(k)).collect();
            cols.push(format!("PRIMARY KEY ({})", keys.join(", ")));
        }
        format!("{} CREATE TABLE IF NOT EXISTS {} ({})", pg::DDL_LOCK, self.target, cols.join(", "))
    }

    /// Starts a flush of what is pending, after the previous one has finished (one transaction
    /// at a time keeps upserts in order).
    async fn flush(&mut self) -> Result<()> {
        self.wait_in_flight().await?;
        if self.pending.rows.is_empty() && self.pending.batches.is_empty() {
            return Ok(());
        }
        let plan = self.prepare().await?;
        let mut pending = std::mem::take(&mut self.pending);
        pending.frozen = Bytes::from(std::mem::take(&mut pending.data));
        let (pool, dl, metrics) = (self.pool.clone(), self.dead_letter.clone(), self.metrics.clone());
        self.in_flight = Some(tokio::spawn(async move { write_pending(plan, pool, pending, dl, metrics).await }));
        Ok(())
    }

    async fn wait_in_flight(&mut self) -> Result<()> {
        if let Some(h) = self.in_flight.take() {
            let started = Instant::now();
            let stored = h.await.map_err(|e| self.error(format!("the write task failed: {e}")))??;
            self.metrics.busy(started.elapsed());
            for (shard, pos) in stored {
                let e = self.committed.entry(shard).or_insert(Some(pos));
                *e = Some(e.map_or(pos, |d| d.max(pos)));
            }
        }
        Ok(())
    }
}

/// Which table column each input column goes to, and whether its type fits.
fn plan_columns(schema: &SchemaRef, table: &[PgColumn]) -> Result<Vec<(usize, PgKind)>, String> {
    let mut out = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let Some(col) = table.iter().find(|c| &c.name == f.name()) else {
            if METADATA_COLUMNS.contains(&f.name().as_str()) {
                continue;
            }
            let have: Vec<&str> = table.iter().map(|c| c.name.as_str()).collect();
            return Err(format!(
                "the input column `{}` is not in the table (its columns: {}); drop or rename it in a sql transform",
                f.name(),
                have.join(", ")
            ));
        };
        let Some(kind) = &col.kind else {
            return Err(format!(
                "column `{}` has type {}, which sluice cannot write; change the column type or leave the column out",
                col.name, col.type_name
            ));
        };
        if !fits(f.data_type(), kind) {
            return Err(format!(
                "the input column `{}` ({}) cannot be written to the table's column of type {}; cast it in a sql transform",
                f.name(),
                crate::config::types::sql_type_name(f.data_type()),
                col.type_name
            ));
        }
        out.push((i, kind.clone()));
    }
    if out.is_empty() {
        return Err("no input column matches a table column".into());
    }
    Ok(out)
}

/// Whether values of `dt` can be written to a column of `kind`.
fn fits(dt: &DataType, kind: &PgKind) -> bool {
    use DataType as D;
    let dt = match dt {
        D::Dictionary(_, v) => v.as_ref(),
        d => d,
    };
    let int = matches!(dt, D::Int8 | D::Int16 | D::Int32 | D::Int64 | D::UInt8 | D::UInt16 | D::UInt32 | D::UInt64);
    let float = matches!(dt, D::Float16 | D::Float32 | D::Float64);
    let text = matches!(dt, D::Utf8 | D::LargeUtf8 | D::Utf8View);
    match kind {
        PgKind::Bool => matches!(dt, D::Boolean),
        PgKind::Int2 | PgKind::Int4 | PgKind::Int8 => int,
        PgKind::Float4 | PgKind::Float8 => int || float || matches!(dt, D::Decimal128(..)),
        PgKind::Numeric(_) => int || float || matches!(dt, D::Decimal128(..)),
        PgKind::Text => text,
        PgKind::Json | PgKind::Jsonb => {
            text || matches!(dt, D::Struct(_) | D::Map(..) | D::List(_) | D::LargeList(_) | D::FixedSizeList(..))
        }
        PgKind::Uuid => text || matches!(dt, D::FixedSizeBinary(16)),
        PgKind::Bytea => matches!(dt, D::Binary | D::LargeBinary | D::BinaryView | D::FixedSizeBinary(_)),
        PgKind::Date => matches!(dt, D::Date32 | D::Date64),
        PgKind::Timestamp | PgKind::Timestamptz => matches!(dt, D::Timestamp(..)),
        PgKind::Time => matches!(dt, D::Time32(_) | D::Time64(_)),
        PgKind::Array(elem, _) => match dt {
            D::List(f) | D::LargeList(f) | D::FixedSizeList(f, _) => fits(f.data_type(), elem),
            _ => false,
        },
    }
}

/// An input column made ready for encoding: cast to one canonical Arrow type per kind.
enum Col {
    Bool(arrow::array::BooleanArray),
    Int(arrow::array::Int64Array, PgKind),
    /// UInt64 values, which may not fit an i64.
    UInt(arrow::array::UInt64Array, PgKind),
    Float(arrow::array::Float64Array, PgKind),
    Decimal(arrow::array::Decimal128Array, i8, PgKind),
    Text(arrow::array::StringArray, PgKind),
    Bytes(arrow::array::BinaryArray, PgKind),
    Date(arrow::array::Date32Array),
    Timestamp(arrow::array::TimestampMicrosecondArray),
    Time(arrow::array::Time64MicrosecondArray),
    /// Pre-rendered JSON text of each row (structs, maps, lists into json/jsonb).
    Json(Vec<Option<Vec<u8>>>, bool),
    List {
        offsets: Vec<usize>,
        nulls: Option<arrow::buffer::NullBuffer>,
        values: Box<Col>,
        elem_oid: u32,
    },
}

fn cast(a: &ArrayRef, to: &DataType) -> Result<ArrayRef, String> {
    if a.data_type() == to {
        return Ok(a.clone());
    }
    // Not `safe`: an overflow (a seconds timestamp past year 294247 in µs) is an error, not a null.
    let options = arrow::compute::CastOptions { safe: false, ..Default::default() };
    arrow::compute::cast_with_options(a, to, &options).map_err(|e| e.to_string())
}

impl Col {
    fn new(a: &ArrayRef, kind: &PgKind) -> Result<Col, String> {
        use DataType as D;
        let a = match a.data_type() {
            D::Dictionary(_, v) => cast(a, v)?,
            _ => a.clone(),
        };
        let dt = a.data_type().clone();
        Ok(match kind {
            PgKind::Bool => Col::Bool(a.as_boolean().clone()),
            PgKind::Json | PgKind::Jsonb if !matches!(dt, D::Utf8 | D::LargeUtf8 | D::Utf8View) => {
                let field = Arc::new(Field::new("v", dt, true));
                let options = arrow::json::writer::EncoderOptions::default();
                let mut enc =
                    arrow::json::writer::make_encoder(&field, a.as_ref(), &options).map_err(|e| e.to_string())?;
                let rows = (0..a.len())
                    .map(|i| {
                        a.is_valid(i).then(|| {
                            let mut out = Vec::new();
                            enc.encode(i, &mut out);
                            out
                        })
                    })
                    .collect();
                Col::Json(rows, *kind == PgKind::Jsonb)
            }
            PgKind::Int2 | PgKind::Int4 | PgKind::Int8 | PgKind::Float4 | PgKind::Float8 | PgKind::Numeric(_) => {
                match dt {
                    D::UInt64 => Col::UInt(a.as_primitive().clone(), kind.clone()),
                    D::Decimal128(_, s) => Col::Decimal(a.as_primitive().clone(), s, kind.clone()),
                    D::Float16 | D::Float32 | D::Float64 => {
                        Col::Float(cast(&a, &D::Float64)?.as_primitive().clone(), kind.clone())
                    }
                    _ => Col::Int(cast(&a, &D::Int64)?.as_primitive().clone(), kind.clone()),
                }
            }
            PgKind::Text | PgKind::Json | PgKind::Jsonb => {
                Col::Text(cast(&a, &D::Utf8)?.as_string().clone(), kind.clone())
            }
            PgKind::Uuid => match dt {
                D::FixedSizeBinary(_) => Col::Bytes(cast(&a, &D::Binary)?.as_binary().clone(), PgKind::Uuid),
                _ => Col::Text(cast(&a, &D::Utf8)?.as_string().clone(), PgKind::Uuid),
            },
            PgKind::Bytea => Col::Bytes(cast(&a, &D::Binary)?.as_binary().clone(), PgKind::Bytea),
            PgKind::Date => Col::Date(cast(&a, &D::Date32)?.as_primitive().clone()),
            PgKind::Timestamp | PgKind::Timestamptz => {
                let tz = match &dt {
                    D::Timestamp(_, tz) => tz.clone(),
                    _ => None,
                };
                Col::Timestamp(cast(&a, &D::Timestamp(TimeUnit::Microsecond, tz))?.as_primitive().clone())
            }
            PgKind::Time => Col::Time(cast(&a, &D::Time64(TimeUnit::Microsecond))?.as_primitive().clone()),
            PgKind::Array(elem, oid) => {
                let (offsets, values, nulls): (Vec<usize>, ArrayRef, _) = match dt {
                    D::List(_) => {
                        let l = a.as_list::<i32>();
                        (l.offsets().iter().map(|o| *o as usize).collect(), l.values().clone(), l.nulls().cloned())
                    }
                    D::LargeList(_) => {
                        let l = a.as_list::<i64>();
                        (l.offsets().iter().map(|o| *o as usize).collect(), l.values().clone(), l.nulls().cloned())
                    }
                    D::FixedSizeList(_, n) => {
                        let l = a.as_fixed_size_list();
                        let n = n as usize;
                        ((0..=l.len()).map(|i| i * n).collect(), l.values().clone(), l.nulls().cloned())
                    }
                    other => return Err(format!("{other} is not a list")),
                };
                Col::List { offsets, nulls, values: Box::new(Col::new(&values, elem)?), elem_oid: *oid }
            }
        })
    }

    fn is_null(&self, i: usize) -> bool {
        match self {
            Col::Bool(a) => a.is_null(i),
            Col::Int(a, _) => a.is_null(i),
            Col::UInt(a, _) => a.is_null(i),
            Col::Float(a, _) => a.is_null(i),
            Col::Decimal(a, _, _) => a.is_null(i),
            Col::Text(a, _) => a.is_null(i),
            Col::Bytes(a, _) => a.is_null(i),
            Col::Date(a) => a.is_null(i),
            Col::Timestamp(a) => a.is_null(i),
            Col::Time(a) => a.is_null(i),
            Col::Json(rows, _) => rows[i].is_none(),
            Col::List { nulls, .. } => nulls.as_ref().is_some_and(|n| n.is_null(i)),
        }
    }

    /// Appends row `i` as one binary COPY field (length, then bytes; -1 for null).
    fn encode(&self, i: usize, out: &mut Vec<u8>) -> Result<(), String> {
        if self.is_null(i) {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            return Ok(());
        }
        match self {
            Col::Bool(a) => field(out, &[u8::from(a.value(i))]),
            Col::Int(a, kind) => int(out, i128::from(a.value(i)), kind)?,
            Col::UInt(a, kind) => int(out, i128::from(a.value(i)), kind)?,
            Col::Float(a, kind) => {
                let v = a.value(i);
                match kind {
                    PgKind::Float4 => field(out, &(v as f32).to_be_bytes()),
                    PgKind::Numeric(_) => float_numeric(out, v)?,
                    _ => field(out, &v.to_be_bytes()),
                }
            }
            Col::Decimal(a, scale, kind) => {
                let v = a.value(i);
                match kind {
                    PgKind::Float4 | PgKind::Float8 => {
                        let f = v as f64 / 10f64.powi(i32::from(*scale));
                        if *kind == PgKind::Float4 {
                            field(out, &(f as f32).to_be_bytes())
                        } else {
                            field(out, &f.to_be_bytes())
                        }
                    }
                    _ if *scale < 0 => {
                        let m = 10i128.checked_pow(u32::from(scale.unsigned_abs())).ok_or("decimal out of range")?;
                        pg::encode_numeric(v.checked_mul(m).ok_or("decimal out of range")?, 0, out)
                    }
                    _ => pg::encode_numeric(v, *scale, out),
                }
            }
            Col::Text(a, kind) => {
                let s = a.value(i);
                if s.contains('\0') {
                    return Err("text with a NUL character (PostgreSQL text cannot hold it)".into());
                }
                match kind {
                    PgKind::Jsonb => {
                        out.extend_from_slice(&((s.len() + 1) as i32).to_be_bytes());
                        out.push(1);
                        out.extend_from_slice(s.as_bytes());
                    }
                    PgKind::Uuid => field(out, &parse_uuid(s)?),
                    _ => field(out, s.as_bytes()),
                }
            }
            Col::Bytes(a, kind) => {
                let b = a.value(i);
                if *kind == PgKind::Uuid && b.len() != 16 {
                    return Err(format!("a uuid needs 16 bytes, not {}", b.len()));
                }
                field(out, b)
            }
            Col::Date(a) => field(out, &(a.value(i) - pg::PG_EPOCH_DAYS).to_be_bytes()),
            Col::Timestamp(a) => {
                let v = a.value(i).checked_sub(pg::PG_EPOCH_MICROS).ok_or("timestamp out of range")?;
                field(out, &v.to_be_bytes())
            }
            Col::Time(a) => field(out, &a.value(i).to_be_bytes()),
            Col::Json(rows, jsonb) => {
                let s = rows[i].as_deref().unwrap_or(b"null");
                if *jsonb {
                    out.extend_from_slice(&((s.len() + 1) as i32).to_be_bytes());
                    out.push(1);
                    out.extend_from_slice(s);
                } else {
                    field(out, s)
                }
            }
            Col::List { offsets, values, elem_oid, .. } => {
                let (start, end) = (offsets[i], offsets[i + 1]);
                let len_at = out.len();
                out.extend_from_slice(&0i32.to_be_bytes());
                let has_null = (start..end).any(|j| values.is_null(j));
                if start == end {
                    // An empty array: no dimensions.
                    out.extend_from_slice(&0i32.to_be_bytes());
                    out.extend_from_slice(&0i32.to_be_bytes());
                    out.extend_from_slice(&elem_oid.to_be_bytes());
                } else {
                    out.extend_from_slice(&1i32.to_be_bytes());
                    out.extend_from_slice(&i32::from(has_null).to_be_bytes());
                    out.extend_from_slice(&elem_oid.to_be_bytes());
                    out.extend_from_slice(&((end - start) as i32).to_be_bytes());
                    out.extend_from_slice(&1i32.to_be_bytes());
                    for j in start..end {
                        values.encode(j, out)?;
                    }
                }
                let len = (out.len() - len_at - 4) as i32;
                out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
            }
        }
        Ok(())
    }
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn int(out: &mut Vec<u8>, v: i128, kind: &PgKind) -> Result<(), String> {
    let range = |name: &str| format!("{v} is out of range for {name}");
    match kind {
        PgKind::Int2 => field(out, &i16::try_from(v).map_err(|_| range("smallint"))?.to_be_bytes()),
        PgKind::Int4 => field(out, &i32::try_from(v).map_err(|_| range("integer"))?.to_be_bytes()),
        PgKind::Int8 => field(out, &i64::try_from(v).map_err(|_| range("bigint"))?.to_be_bytes()),
        PgKind::Float4 => field(out, &(v as f32).to_be_bytes()),
        PgKind::Float8 => field(out, &(v as f64).to_be_bytes()),
        _ => pg::encode_numeric(v, 0, out),
    }
    Ok(())
}

/// A float as `numeric`: NaN and infinities as PostgreSQL spells them, finite values through their
/// shortest decimal text.
fn float_numeric(out: &mut Vec<u8>, v: f64) -> Result<(), String> {
    let special = |sign: u16, out: &mut Vec<u8>| {
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    };
    if v.is_nan() {
        special(0xC000, out);
        return Ok(());
    }
    if v.is_infinite() {
        special(if v > 0.0 { 0xD000 } else { 0xF000 }, out);
        return Ok(());
    }
    let text = format!("{v:e}");
    let (mantissa, exp) = text.split_once('e').ok_or("unprintable float")?;
    let exp: i32 = exp.parse().map_err(|_| "unprintable float")?;
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    // value = digits × 10^(exp - (len - 1))
    let shift = exp - (digits.len() as i32 - 1);
    let mut unscaled: i128 = digits.parse().map_err(|_| "unprintable float")?;
    if negative {
        unscaled = -unscaled;
    }
    if shift >= 0 {
        let m = 10i128.checked_pow(shift as u32).ok_or_else(|| format!("{v} is too large for numeric"))?;
        pg::encode_numeric(unscaled.checked_mul(m).ok_or_else(|| format!("{v} is too large for numeric"))?, 0, out);
    } else {
        let scale = i8::try_from(-shift).map_err(|_| format!("{v} is too small for numeric(38)"))?;
        pg::encode_numeric(unscaled, scale, out);
    }
    Ok(())
}

fn parse_uuid(s: &str) -> Result<[u8; 16], String> {
    let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    let bad = || format!("`{s}` is not a uuid");
    if hex.len() != 32 {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let h = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(h, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// A complete binary COPY stream of `rows` of `p` (header, tuples, trailer), in chunks.
fn copy_stream(p: &Pending, rows: std::ops::Range<usize>) -> Vec<Bytes> {
    let start = if rows.start == 0 { 0 } else { p.row_ends[rows.start - 1] };
    let end = if rows.is_empty() { start } else { p.row_ends[rows.end - 1] };
    let mut header = Vec::with_capacity(19);
    header.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    header.extend_from_slice(&0i32.to_be_bytes());
    header.extend_from_slice(&0i32.to_be_bytes());
    let mut chunks = vec![Bytes::from(header)];
    let mut at = start;
    while at < end {
        let next = (at + COPY_CHUNK).min(end);
        chunks.push(p.frozen.slice(at..next));
        at = next;
    }
    chunks.push(Bytes::from_static(b"\xff\xff"));
    chunks
}

async fn copy(
    client: &tokio_postgres::Client,
    statement: &str,
    chunks: Vec<Bytes>,
) -> Result<u64, tokio_postgres::Error> {
    let sink = client.copy_in::<_, Bytes>(statement).await?;
    futures::pin_mut!(sink);
    for c in chunks {
        sink.send(c).await?;
    }
    sink.finish().await
}

/// Outcome of one attempt at a flush's transaction.
enum Attempt {
    Done(HashMap<String, u64>),
    /// Failed; worth retrying on a fresh connection.
    Retry(String),
}

/// Writes `p` in one transaction, retrying transient failures; returns the positions stored.
async fn write_pending(
    plan: Arc<Plan>,
    pool: Pool,
    p: Pending,
    dead_letter: DeadLetter,
    metrics: ComponentMetrics,
) -> Result<HashMap<String, u64>> {
    let result = write_with_retries(&plan, &pool, &p, &dead_letter, &metrics).await;
    if result.is_err() {
        // Nothing of these batches was written: their positions must not be committed when they
        // drop here, before the pipeline has seen the error.
        for b in &p.batches {
            b.ack.clone().abandon();
        }
    }
    result
}

async fn write_with_retries(
    plan: &Plan,
    pool: &Pool,
    p: &Pending,
    dead_letter: &DeadLetter,
    metrics: &ComponentMetrics,
) -> Result<HashMap<String, u64>> {
    let err = |message: String| Error::Service { component: plan.component.clone(), message };
    let retries = metrics::counter!(names::POSTGRES_RETRIES_TOTAL, "component" => plan.component.clone());
    let mut attempt = 0;
    let mut maybe_committed = false;
    loop {
        attempt += 1;
        let outcome = match pool.get().await {
            Err(e) => Attempt::Retry(pg::pool_error(&e, "the server")),
            Ok(client) => {
                // A commit whose answer was lost may have landed: the stored positions tell.
                if maybe_committed && plan.offsets_table.is_some() {
                    match stored_covers(plan, &client, p).await {
                        Ok(Landed::Yes) => {
                            tracing::info!(component = %plan.component, "the lost commit had landed");
                            return Ok(p.positions.clone());
                        }
                        Ok(Landed::No) => {}
                        Ok(Landed::Fenced(shard)) => {
                            let t = plan.offsets_table.as_deref().unwrap_or_default();
                            let message = format!(
                                "{t} holds a newer epoch for {shard} than this worker's lost commit (another worker owns it now)"
                            );
                            return Err(Error::Fenced { component: plan.component.clone(), message });
                        }
                        Err(e) => {
                            let _ = deadpool_postgres::Object::take(client);
                            tracing::warn!(component = %plan.component, "checking the stored positions failed: {}", pg::message(&e));
                            tokio::time::sleep(pg::backoff(attempt)).await;
                            continue;
                        }
                    }
                }
                // Worker mode: the lease and the epochs are checked before anything is sent, and
                // the epochs again in the database, inside the transaction.
                if let Some(why) = p.batches.iter().find_map(|b| crate::fence::check(&b.shard).err()) {
                    return Err(Error::Fenced { component: plan.component.clone(), message: why });
                }
                let written = match transaction(plan, &client, p).await {
                    Ok(Err(fenced)) => {
                        let _ = client.batch_execute("ROLLBACK").await;
                        return Err(Error::Fenced { component: plan.component.clone(), message: fenced });
                    }
                    Ok(Ok(refused)) if refused.is_empty() => Ok(()),
                    Ok(Ok(refused)) => {
                        // Sent before the commit: a crash in between sends them again rather
                        // than losing them. Without a dead-letter sink nothing is committed.
                        if let Err(e) = send_refused(plan, p, refused, dead_letter, metrics).await {
                            let _ = client.batch_execute("ROLLBACK").await;
                            return Err(e);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                let committed = match written {
                    Ok(()) => {
                        if let Some(why) = p.batches.iter().find_map(|b| crate::fence::check(&b.shard).err()) {
                            let _ = client.batch_execute("ROLLBACK").await;
                            return Err(Error::Fenced { component: plan.component.clone(), message: why });
                        }
                        maybe_committed = true;
                        client.batch_execute("COMMIT").await
                    }
                    Err(e) => Err(e),
                };
                match committed {
                    Ok(()) => Attempt::Done(p.positions.clone()),
                    Err(e) => {
                        let _ = client.batch_execute("ROLLBACK").await;
                        if !pg::is_transient(&e) {
                            return Err(err(format!("writing to {}: {}", plan.target, pg::message(&e))));
                        }
                        let _ = deadpool_postgres::Object::take(client);
                        Attempt::Retry(pg::message(&e))
                    }
                }
            }
        };
        match outcome {
            Attempt::Done(stored) => {
                metrics::counter!(names::POSTGRES_ROWS_WRITTEN_TOTAL, "component" => plan.component.clone())
                    .increment(p.rows.len() as u64);
                metrics::counter!(names::POSTGRES_TRANSACTIONS_TOTAL, "component" => plan.component.clone())
                    .increment(1);
                return Ok(stored);
            }
            Attempt::Retry(why) if attempt < plan.max_attempts => {
                retries.increment(1);
                let wait = pg::backoff(attempt);
                tracing::warn!(component = %plan.component, attempt, "writing to {} failed, retrying in {wait:?}: {why}", plan.target);
                tokio::time::sleep(wait).await;
            }
            Attempt::Retry(why) => {
                return Err(err(format!("writing to {} failed {attempt} times; last: {why}", plan.target)));
            }
        }
    }
}

/// Why preparing the sink failed, and whether trying again on a fresh connection may help.
struct Prep {
    error: Error,
    transient: bool,
}

impl From<Error> for Prep {
    fn from(error: Error) -> Self {
        Prep { error, transient: false }
    }
}

/// What the offsets table says about a transaction whose COMMIT got no answer.
#[derive(Debug, PartialEq)]
enum Landed {
    /// Every shard's stored position covers the transaction's: it committed.
    Yes,
    No,
    /// Worker mode: a newer epoch wrote this shard since. Its position then says nothing about
    /// this transaction, and the shard is another worker's now.
    Fenced(String),
}

/// Reads the stored positions and epochs of this sink's shards and judges a lost commit by them.
async fn stored_covers(
    plan: &Plan,
    client: &tokio_postgres::Client,
    p: &Pending,
) -> Result<Landed, tokio_postgres::Error> {
    let Some(t) = &plan.offsets_table else { return Ok(Landed::No) };
    let rows = client
        .query(
            &format!("SELECT shard, position, epoch FROM {t} WHERE pipeline = $1 AND sink = $2 AND shard = ANY($3)"),
            &[&plan.pipeline, &plan.component, &p.positions.keys().collect::<Vec<&String>>()],
        )
        .await?;
    let stored: HashMap<String, (i64, i64)> = rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
    Ok(judge_lost_commit(&stored, &p.positions, &epochs_of(p), crate::fence::active()))
}

/// Judges a lost commit by `stored` (shard → position, epoch): landed when every stored position
/// covers ours. With `fenced` (worker mode), the first shard whose stored epoch is newer than ours
/// is [`Landed::Fenced`]: a newer owner may have moved its position past ours whether or not our
/// transaction landed.
fn judge_lost_commit(
    stored: &HashMap<String, (i64, i64)>,
    positions: &HashMap<String, u64>,
    epochs: &HashMap<String, i64>,
    fenced: bool,
) -> Landed {
    let mut covered = true;
    for (shard, position) in positions {
        let Some(&(at, epoch)) = stored.get(shard) else {
            covered = false;
            continue;
        };
        if fenced && epoch > epochs.get(shard).copied().unwrap_or(0) {
            return Landed::Fenced(shard.clone());
        }
        covered &= u64::try_from(at).is_ok_and(|at| at >= *position);
    }
    if covered {
        Landed::Yes
    } else {
        Landed::No
    }
}

/// The epoch of the grant each shard of `p` was read under (0 outside worker mode).
fn epochs_of(p: &Pending) -> HashMap<String, i64> {
    p.batches.iter().map(|b| (shard_key(b), b.shard.epoch.unwrap_or(0) as i64)).collect()
}

/// One attempt up to the COMMIT: BEGIN, the rows (bisecting around refused ones), the positions.
/// Returns the refused rows (index in `p`, the server's message).
async fn transaction(
    plan: &Plan,
    client: &tokio_postgres::Client,
    p: &Pending,
) -> Result<Result<Vec<(usize, String)>, String>, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let n = p.rows.len();
    let mut refused: Vec<(usize, String)> = Vec::new();
    if n > 0 {
        match (&plan.stage_ddl, &plan.merge) {
            (Some(ddl), Some(merge)) => {
                client.batch_execute(ddl).await?;
                // The staging table keeps the columns' modifiers and domains (varchar(10),
                // numeric(5,2)), so a row can be refused already here; it is then not staged.
                isolate(client, n, &mut refused, |r| async move {
                    copy(client, &plan.copy, copy_stream(p, r)).await.map(|_| ())
                })
                .await?;
                let merge = client.prepare(merge).await?;
                isolate(client, n, &mut refused, |r| {
                    let merge = merge.clone();
                    async move { client.execute(&merge, &[&(r.start as i64), &(r.end as i64 - 1)]).await.map(|_| ()) }
                })
                .await?;
            }
            _ => {
                isolate(client, n, &mut refused, |r| async move {
                    copy(client, &plan.copy, copy_stream(p, r)).await.map(|_| ())
                })
                .await?;
            }
        }
    }
    if let Some(t) = &plan.offsets_table {
        if !p.positions.is_empty() {
            let shards: Vec<&str> = p.positions.keys().map(String::as_str).collect();
            let positions: Vec<i64> = p.positions.values().map(|v| *v as i64).collect();
            // Worker mode: each shard's row carries the epoch of the worker that wrote it last,
            // and a write with an older epoch (a zombie whose shard moved) updates nothing.
            let epochs = epochs_of(p);
            let epoch_of: Vec<i64> = p.positions.keys().map(|k| epochs.get(k).copied().unwrap_or(0)).collect();
            let fenced = crate::fence::active();
            let (set_epoch, guard) =
                if fenced { ("EXCLUDED.epoch", " WHERE o.epoch <= EXCLUDED.epoch") } else { ("o.epoch", "") };
            let updated = client
                .execute(
                    &format!(
                        "INSERT INTO {t} AS o (pipeline, sink, shard, position, epoch) \
                         SELECT $1, $2, s, p, e FROM unnest($3::text[], $4::int8[], $5::int8[]) AS u(s, p, e) \
                         ON CONFLICT (pipeline, sink, shard) DO UPDATE \
                         SET position = GREATEST(o.position, EXCLUDED.position), epoch = {set_epoch}, \
                         updated_at = now(){guard}"
                    ),
                    &[&plan.pipeline, &plan.component, &shards, &positions, &epoch_of],
                )
                .await?;
            if fenced && (updated as usize) < shards.len() {
                return Ok(Err(format!(
                    "{t} holds a newer epoch for a shard of this write (another worker owns it now): \
                     the transaction is rolled back"
                )));
            }
        }
    }
    Ok(Ok(refused))
}

/// Runs `f` over all rows inside a savepoint; when the server refuses some rows, splits the range
/// until each refused row stands alone (and is recorded in `refused`), keeping the rest.
async fn isolate<'a, F, Fut>(
    client: &tokio_postgres::Client,
    n: usize,
    refused: &mut Vec<(usize, String)>,
    mut f: F,
) -> Result<(), tokio_postgres::Error>
where
    F: FnMut(std::ops::Range<usize>) -> Fut,
    Fut: std::future::Future<Output = Result<(), tokio_postgres::Error>> + 'a,
{
    let mut stack: Vec<std::ops::Range<usize>> = Vec::with_capacity(64);
    stack.push(0..n);
    while let Some(range) = stack.pop() {
        client.batch_execute("SAVEPOINT sluice_rows").await?;
        match f(range.clone()).await {
            Ok(()) => client.batch_execute("RELEASE SAVEPOINT sluice_rows").await?,
            Err(e) if pg::is_row_error(&e) => {
                // Rolled back and released, so savepoints do not nest deeper with each split.
                client.batch_execute("ROLLBACK TO SAVEPOINT sluice_rows; RELEASE SAVEPOINT sluice_rows").await?;
                if range.len() == 1 {
                    refused.push((range.start, pg::message(&e)));
                } else {
                    let mid = range.start + range.len() / 2;
                    stack.push(mid..range.end);
                    stack.push(range.start..mid);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// # Errors
/// Without a dead-letter sink (the first refused row is the error), or when it has stopped.
async fn send_refused(
    plan: &Plan,
    p: &Pending,
    refused: Vec<(usize, String)>,
    dead_letter: &DeadLetter,
    metrics: &ComponentMetrics,
) -> Result<()> {
    metrics::counter!(names::POSTGRES_REFUSED_ROWS_TOTAL, "component" => plan.component.clone())
        .increment(refused.len() as u64);
    let mut by_batch: HashMap<u32, Vec<BadRecord>> = HashMap::new();
    for (row, message) in refused {
        let (b, i) = p.rows[row];
        let batch = &p.batches[b as usize];
        by_batch.entry(b).or_default().push(BadRecord {
            position: batch.row_position(i as usize),
            stage: Stage::Write,
            error: format!("PostgreSQL refused the row for {}: {message}", plan.target),
            raw: row_as_json(&batch.data, i as usize),
            key: None,
        });
    }
    let mut by_batch: Vec<_> = by_batch.into_iter().collect();
    by_batch.sort_by_key(|(b, _)| *b);
    for (b, bad) in by_batch {
        let batch = &p.batches[b as usize];
        dead_letter.send(metrics, &batch.shard, &batch.ack, bad).await?;
    }
    Ok(())
}

/// Shard key of a batch in `sluice_offsets`: `source/shard`.
/// The offsets table's `shard`: `{source}/{id}`, and `@{version}` for a shard whose content has a
/// version (an S3 object's ETag), so that a rewritten object, read again from its first
/// position, is not taken for the rows of the old one.
fn shard_key(batch: &Batch) -> String {
    match batch.shard.version() {
        Some(v) => format!("{}/{}@{}", batch.shard.source, batch.shard.id, v.trim_matches('"')),
        None => format!("{}/{}", batch.shard.source, batch.shard.id),
    }
}

#[async_trait]
impl Sink for PostgresSink {
    fn set_dead_letter(&mut self, dead_letter: DeadLetter) {
        self.dead_letter = dead_letter;
    }

    async fn write(&mut self, batch: Batch) -> Result<()> {
        let plan = self.prepare().await?;
        let n = batch.data.num_rows();
        // Exactly-once: rows at or before the stored position were written by an earlier run.
        let keep: Vec<usize> = match &plan.offsets_table {
            Some(t) => {
                let key = shard_key(&batch);
                if crate::fence::active() && !self.claimed.contains(&key) {
                    self.forget_idle_shards();
                    self.claim(&plan, &batch, &key).await?;
                }
                let done = self.look_up(t, &key).await?;
                let positions = crate::sink::writer::row_positions(&self.component, &batch)?;
                if done.is_none_or(|d| batch.last > d) {
                    let e = self.pending.positions.entry(key).or_insert(batch.last);
                    *e = (*e).max(batch.last);
                }
                match done {
                    Some(done) => (0..n).filter(|i| positions[*i] > done).collect(),
                    None => (0..n).collect(),
                }
            }
            None => (0..n).collect(),
        };
        let cols = plan
            .columns
            .iter()
            .map(|(i, kind)| Col::new(batch.data.column(*i), kind))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| self.error(format!("encoding for {}: {e}", self.target)))?;
        let b = self.pending.batches.len() as u32;
        let ncols = (cols.len() as i16).to_be_bytes();
        let with_seq = plan.merge.is_some();
        let mut bad = Vec::new();
        let out = &mut self.pending.data;
        for i in keep {
            let start = out.len();
            out.extend_from_slice(&if with_seq { (cols.len() as i16 + 1).to_be_bytes() } else { ncols });
            let mut failed = None;
            for (c, col) in cols.iter().enumerate() {
                if let Err(e) = col.encode(i, out) {
                    failed = Some(format!("column `{}`: {e}", batch.data.schema().field(plan.columns[c].0).name()));
                    break;
                }
            }
            if let Some(error) = failed {
                out.truncate(start);
                bad.push(BadRecord {
                    position: batch.row_position(i),
                    stage: Stage::Write,
                    error,
                    raw: row_as_json(&batch.data, i),
                    key: None,
                });
                continue;
            }
            if with_seq {
                let seq = self.pending.rows.len() as i64;
                out.extend_from_slice(&8i32.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
            }
            self.pending.row_ends.push(out.len());
            self.pending.rows.push((b, i as u32));
        }
        if !bad.is_empty() {
            self.dead_letter.send(&self.metrics, &batch.shard, &batch.ack, bad).await?;
        }
        self.pending.batches.push(batch);
        self.pending.since.get_or_insert_with(Instant::now);
        if self.pending.rows.len() >= self.batch_rows || self.pending.data.len() >= self.batch_bytes {
            self.flush().await?;
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<()> {
        if self.in_flight.as_ref().is_some_and(|h| h.is_finished()) {
            self.wait_in_flight().await?;
        }
        if self.pending.since.is_some_and(|s| s.elapsed() >= self.flush_interval) && self.in_flight.is_none() {
            self.flush().await?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        if !self.pending.batches.is_empty() {
            self.flush().await?;
        }
        self.wait_in_flight().await
    }

    async fn abort(&mut self) {
        if let Some(h) = self.in_flight.take() {
            h.abort();
        }
        self.pending = Pending::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_become_exact_numerics() {
        let mut out = Vec::new();
        float_numeric(&mut out, 1.5).unwrap();
        let mut want = Vec::new();
        pg::encode_numeric(15, 1, &mut want);
        assert_eq!(out, want);
        out.clear();
        float_numeric(&mut out, f64::NAN).unwrap();
        assert_eq!(&out[8..10], &[0xC0, 0]);
    }

    #[test]
    fn types_that_fit_and_that_do_not() {
        assert!(fits(&DataType::Int32, &PgKind::Int8));
        assert!(fits(&DataType::Decimal128(12, 2), &PgKind::Numeric(Some((12, 2)))));
        assert!(!fits(&DataType::Utf8, &PgKind::Int4));
        assert!(!fits(&DataType::Int64, &PgKind::Text));
        let list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
        assert!(fits(&list, &PgKind::Array(Box::new(PgKind::Text), 25)));
        assert!(fits(&list, &PgKind::Jsonb));
    }

    #[test]
    fn structs_become_jsonb_and_lists_become_arrays() {
        use arrow::array::{Int32Array, ListArray, StringArray, StructArray};
        let st: ArrayRef = Arc::new(StructArray::from(vec![
            (Arc::new(Field::new("a", DataType::Int32, true)), Arc::new(Int32Array::from(vec![1])) as ArrayRef),
            (Arc::new(Field::new("b", DataType::Utf8, true)), Arc::new(StringArray::from(vec!["x"])) as ArrayRef),
        ]));
        let mut out = Vec::new();
        Col::new(&st, &PgKind::Jsonb).unwrap().encode(0, &mut out).unwrap();
        let json = br#"{"a":1,"b":"x"}"#;
        assert_eq!(&out[..4], &((json.len() + 1) as i32).to_be_bytes());
        assert_eq!(out[4], 1, "jsonb version byte");
        assert_eq!(&out[5..], json);
        // [7, null] as int4[]: one dimension, a null flag, element oid 23, size 2, lower bound 1.
        let list: ArrayRef =
            Arc::new(ListArray::from_iter_primitive::<arrow::datatypes::Int32Type, _, _>(vec![Some(vec![
                Some(7),
                None,
            ])]));
        let mut out = Vec::new();
        Col::new(&list, &PgKind::Array(Box::new(PgKind::Int4), 23)).unwrap().encode(0, &mut out).unwrap();
        let mut want: Vec<u8> = Vec::new();
        for v in [1i32, 1, 23, 2, 1, 4, 7, -1] {
            want.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(&out[4..], &want[..]);
        assert_eq!(i32::from_be_bytes(out[..4].try_into().unwrap()) as usize, want.len());
    }

    #[test]
    fn a_lost_commit_is_judged_by_position_and_epoch() {
        let map = |v: &[(&str, (i64, i64))]| v.iter().map(|(k, x)| (k.to_string(), *x)).collect::<HashMap<_, _>>();
        let positions: HashMap<String, u64> = [("t/0".to_string(), 100), ("t/1".to_string(), 50)].into();
        let epochs: HashMap<String, i64> = [("t/0".to_string(), 7), ("t/1".to_string(), 7)].into();
        let ours = map(&[("t/0", (100, 7)), ("t/1", (60, 7))]);
        assert_eq!(judge_lost_commit(&ours, &positions, &epochs, true), Landed::Yes);
        let before = map(&[("t/0", (90, 7)), ("t/1", (60, 7))]);
        assert_eq!(judge_lost_commit(&before, &positions, &epochs, true), Landed::No);
        assert_eq!(judge_lost_commit(&map(&[("t/0", (100, 7))]), &positions, &epochs, true), Landed::No);
        // A newer owner moved t/1 past our position: that is not our commit landing.
        let moved = map(&[("t/0", (100, 7)), ("t/1", (80, 9))]);
        assert_eq!(judge_lost_commit(&moved, &positions, &epochs, true), Landed::Fenced("t/1".to_string()));
        // Outside worker mode epochs are not kept (all 0) and not looked at.
        assert_eq!(judge_lost_commit(&moved, &positions, &HashMap::new(), false), Landed::Yes);
    }

    #[test]
    fn out_of_range_integers_are_row_errors() {
        let mut out = Vec::new();
        assert!(int(&mut out, 70_000, &PgKind::Int2).is_err());
        int(&mut out, 7, &PgKind::Int2).unwrap();
        assert_eq!(out, [0, 0, 0, 2, 0, 7]);
        assert_eq!(parse_uuid("00112233-4455-6677-8899-aabbccddeeff").unwrap()[15], 0xff);
        assert!(parse_uuid("nope").is_err());
    }
}
