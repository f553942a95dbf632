//! The `postgres` source: a table or query read with `COPY (…) TO STDOUT (FORMAT binary)` and
//! decoded straight into Arrow builders, split into shards (ranges of an integer column, or of the
//! table's pages) read in parallel; or, with `cursor_column`, polled incrementally, its position
//! kept in a table of the source database.
//!
//! Incremental reads never skip rows with tied cursor values or rows whose transaction commits
//! late: a poll reads every row up to a bound, the largest cursor value seen at least
//! `safety_margin` ago (so a transaction that took that value's turn has had that long to commit),
//! and a position is committed only at a value whose rows have all been read.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, ListBuilder, StringBuilder, Time64MicrosecondBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use deadpool_postgres::Pool;
use futures::StreamExt;
use serde::Deserialize;

use super::{Produced, ShardContext, Source};
use crate::batch::{PositionCommitter, RecordingCommitter, ShardInfo, ShardKind};
use crate::config::HumanDuration;
use crate::dead_letter::{BadRecord, Stage};
use crate::observe::names;
use crate::postgres::{self as pg, PgColumn, PgKind, TlsSettings};
use crate::{Error, Result};

/// How often an incremental source looks for new rows.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// How long a cursor value must have been the largest seen before rows up to it are read.
pub const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_secs(5);
/// Added to a key to make it a position (see `finish_batch`).
const KEY_POSITION_SHIFT: i128 = 1 << 62;
/// COPY messages (rows) taken from the connection at once.
const COPY_MESSAGES_AT_ONCE: usize = 1024;
/// Table of incremental positions, in the source database.
pub const DEFAULT_POSITIONS_TABLE: &str = "sluice_source_positions";

/// `[sources.ID] type = "postgres"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// `postgres://user:password@host:5432/database` (use `${VAR}`); `?sslmode=require` for TLS.
    pub url: String,
    /// The table to read, `table` or `schema.table`.
    pub table: Option<String>,
    /// Or: a query (a SELECT) whose rows are read.
    pub query: Option<String>,
    /// Shards read in parallel (default 1): ranges of `shard_column`, or of the table's pages.
    pub shards: Option<usize>,
    /// Integer column whose range is split into `shards` (default: the table's integer primary
    /// key; without one, a table is split by pages).
    pub shard_column: Option<String>,
    /// Incremental mode: the column (a timestamp or increasing integer) polled for new rows.
    pub cursor_column: Option<String>,
    /// Incremental mode: how often to look for new rows (default 5s).
    pub poll_interval: Option<HumanDuration>,
    /// Incremental mode: how long a transaction may take to commit (default 5s); rows become
    /// visible to sluice that much later.
    pub safety_margin: Option<HumanDuration>,
    /// Incremental mode: table in the source database that keeps the positions (default
    /// `sluice_source_positions`, created when missing).
    pub positions_table: Option<String>,
    /// TLS settings beyond the URL's `sslmode`.
    #[serde(default)]
    pub tls: TlsSettings,
}

/// Reads a table or query.
pub struct PostgresSource {
    id: String,
    pool: Pool,
    describe: String,
    schema: SchemaRef,
    columns: Vec<PgColumn>,
    /// `FROM` clause: the quoted table, or `(query) AS q`.
    from: String,
    is_table: bool,
    shards: usize,
    shard_column: Option<String>,
    cursor: Option<Cursor>,
    committer: Arc<dyn PositionCommitter>,
    /// When this source was built (µs since the epoch): the run nonce of keyless shard ids.
    run_started: u128,
}

struct Cursor {
    /// The table's primary key: ties of the cursor are read in its order, the same each run.
    order: Vec<String>,
    column: String,
    /// `format_type` of the column, to cast stored text back.
    type_name: String,
    poll_interval: Duration,
    safety_margin: Duration,
    store: Arc<CursorStore>,
}

impl PostgresSource {
    /// Connects to describe the columns.
    ///
    /// # Errors
    /// `(key, message)` naming the setting at fault (an unreachable server is reported on `url`).
    pub async fn new(
        id: &str,
        pipeline: &str,
        config: &PostgresSourceConfig,
        parallelism: usize,
    ) -> Result<Self, (&'static str, String)> {
        let pg_config = pg::parse_url(&config.url).map_err(|e| ("url", e))?;
        let describe = pg::describe_target(&pg_config);
        let shards = config.shards.unwrap_or(1);
        if shards == 0 {
            return Err(("shards", "must be at least 1".into()));
        }
        // A connection per shard read at once (each holds its own for the whole shard), one more
        // for listing and positions.
        let pool = pg::pool(pg_config, &config.tls, shards.min(parallelism).max(1) + 1).map_err(|e| ("tls", e))?;
        let client = pool.get().await.map_err(|e| ("url", pg::pool_error(&e, &describe)))?;
        let (from, is_table, columns) = match (&config.table, &config.query) {
            (Some(t), None) => {
                let (_, _, full) = pg::quote_table(t).map_err(|e| ("table", e))?;
                let cols = pg::table_columns(&client, &full)
                    .await
                    .map_err(|e| ("table", format!("reading the columns of {full}: {}", pg::message(&e))))?
                    .ok_or_else(|| ("table", format!("table {full} does not exist in {describe}")))?;
                (full, true, cols)
            }
            (None, Some(q)) => {
                let q = q.trim().trim_end_matches(';').to_string();
                // The query's columns and types, from a temporary view of it.
                let described = async {
                    client.batch_execute("BEGIN").await?;
                    client.batch_execute(&format!("CREATE TEMP VIEW sluice_describe AS {q}")).await?;
                    let cols = pg::table_columns(&client, "pg_temp.sluice_describe").await;
                    let _ = client.batch_execute("ROLLBACK").await;
                    cols
                }
                .await;
                let cols = match described {
                    Ok(Some(c)) => c,
                    Ok(None) => return Err(("query", "the query has no columns".into())),
                    Err(e) => {
                        let _ = client.batch_execute("ROLLBACK").await;
                        return Err(("query", format!("the query does not run on {describe}: {}", pg::message(&e))));
                    }
                };
                (format!("({q}) AS q"), false, cols)
            }
            _ => return Err(("table", "give either `table` or `query`".into())),
        };
        let mut fields = Vec::new();
        for c in &columns {
            let Some(kind) = &c.kind else {
                return Err((
                    if is_table { "table" } else { "query" },
                    format!(
                        "column `{}` has type {}, which sluice cannot read; cast it in a query (e.g. {}::text)",
                        c.name, c.type_name, c.name
                    ),
                ));
            };
            fields.push(Field::new(&c.name, kind.arrow_type(), !c.not_null));
        }
        let column_named = |key: &'static str, name: &str| {
            columns.iter().find(|c| c.name == name).ok_or_else(|| {
                let have: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                (key, format!("column `{name}` is not among the columns read: {}", have.join(", ")))
            })
        };
        // The table's primary key: the default shard column when it is one integer column, and
        // the order of an incremental read's ties.
        let primary_key = if is_table {
            primary_key(&client, &from).await.map_err(|e| ("table", pg::message(&e)))?
        } else {
            Vec::new()
        };
        let is_integer = |c: &PgColumn| matches!(c.kind, Some(PgKind::Int2 | PgKind::Int4 | PgKind::Int8));
        let mut shard_column = None;
        if let Some(c) = &config.shard_column {
            let col = column_named("shard_column", c)?;
            if !is_integer(col) {
                return Err(("shard_column", format!("`{c}` is {}; shards split an integer column", col.type_name)));
            }
            shard_column = Some(c.clone());
        } else if let [key] = primary_key.as_slice() {
            // Also with one shard: rows are read in key order and the key is their position.
            shard_column = columns.iter().find(|c| &c.name == key).filter(|c| is_integer(c)).map(|c| c.name.clone());
        }
        if shards > 1 && shard_column.is_none() && !is_table {
            return Err(("shard_column", "a sharded query needs an integer shard_column".into()));
        }
        let cursor = match &config.cursor_column {
            None => None,
            Some(c) => {
                let col = column_named("cursor_column", c)?;
                if shards > 1 {
                    return Err(("shards", "an incremental source (cursor_column) reads one shard".into()));
                }
                let (_, _, positions) =
                    pg::quote_table(config.positions_table.as_deref().unwrap_or(DEFAULT_POSITIONS_TABLE))
                        .map_err(|e| ("positions_table", e))?;
                Some(Cursor {
                    order: primary_key.clone(),
                    column: c.clone(),
                    type_name: col.type_name.clone(),
                    poll_interval: config.poll_interval.map_or(DEFAULT_POLL_INTERVAL, |d| d.0),
                    safety_margin: config.safety_margin.map_or(DEFAULT_SAFETY_MARGIN, |d| d.0),
                    store: Arc::new(CursorStore {
                        pool: pool.clone(),
                        table: positions,
                        pipeline: pipeline.to_string(),
                        source: id.to_string(),
                        marks: Mutex::new(BTreeMap::new()),
                        latest: Mutex::new(None),
                        read_at: Mutex::new(HashMap::new()),
                        written: tokio::sync::Mutex::new(None),
                    }),
                })
            }
        };
        let committer: Arc<dyn PositionCommitter> = match &cursor {
            Some(c) => c.store.clone(),
            None => Arc::new(RecordingCommitter::default()),
        };
        drop(client);
        Ok(PostgresSource {
            id: id.to_string(),
            pool,
            describe,
            schema: Arc::new(Schema::new(fields)),
            columns,
            from,
            is_table,
            shards,
            shard_column,
            cursor,
            committer,
            run_started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros()),
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Service { component: self.id.clone(), message: message.into() }
    }

    fn select_list(&self) -> String {
        self.columns.iter().map(|c| pg::quote_ident(&c.name)).collect::<Vec<_>>().join(", ")
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| self.error(pg::pool_error(&e, &self.describe)))
    }

    /// Streams `COPY (sql) TO STDOUT (FORMAT binary)` into batches; returns the number of rows.
    /// With a cursor, the last column of each row is the cursor's text, kept out of the batch and
    /// handed to `on_batch` (with the batch's last position, and whether it is the stream's last
    /// batch) just before the batch is emitted; each batch waits for the next so that the last one
    /// is known.
    async fn copy_out(
        &self,
        ctx: &ShardContext,
        sql: &str,
        start: u64,
        mut on_batch: impl FnMut(&[String], u64, bool),
    ) -> Result<u64> {
        let client = self.client().await?;
        let statement = format!("COPY ({sql}) TO STDOUT (FORMAT binary)");
        let read_error = |e: tokio_postgres::Error| {
            self.error(format!("reading {} on {}: {}", self.from, self.describe, pg::message(&e)))
        };
        // The server sends a message per row: take whatever has arrived at once, so the
        // cancellation check and the decode loop run per chunk, not per row.
        let stream = client.copy_out(statement.as_str()).await.map_err(read_error)?.ready_chunks(COPY_MESSAGES_AT_ONCE);
        futures::pin_mut!(stream);
        let mut decoder = Decoder::new(&self.schema, &self.columns, self.cursor.is_some(), ctx.batch_size);
        let mut buf = BytesMut::new();
        let mut position = start;
        let rows_read = metrics::counter!(names::POSTGRES_ROWS_READ_TOTAL, "component" => self.id.clone());
        let mut held: Option<(Produced, Vec<String>)> = None;
        loop {
            let chunk = tokio::select! {
                c = stream.next() => c,
                _ = ctx.cancel.cancelled() => return Ok(position - start),
            };
            let done = match chunk {
                Some(messages) => {
                    for m in messages {
                        buf.extend_from_slice(&m.map_err(read_error)?);
                    }
                    false
                }
                None => true,
            };
            let mut at = 0;
            loop {
                let (row, used) = decoder
                    .next_row(&buf[at..], position + 1)
                    .map_err(|e| self.error(format!("reading {}: {e}", self.from)))?;
                at += used;
                match row {
                    Row::Incomplete | Row::End => break,
                    Row::Decoded => position += 1,
                }
                if decoder.rows() >= ctx.batch_size {
                    let next = self.finish_batch(&mut decoder, position)?;
                    if let Some((p, cursors)) = held.replace(next) {
                        rows_read.increment(p.positions.len() as u64);
                        on_batch(&cursors, p.last, false);
                        ctx.emit(p).await?;
                    }
                }
            }
            buf.advance(at);
            if done {
                break;
            }
        }
        if decoder.rows() > 0 || decoder.has_bad() {
            let next = self.finish_batch(&mut decoder, position)?;
            if let Some((p, cursors)) = held.replace(next) {
                rows_read.increment(p.positions.len() as u64);
                on_batch(&cursors, p.last, false);
                ctx.emit(p).await?;
            }
        }
        if let Some((p, cursors)) = held {
            rows_read.increment(p.positions.len() as u64);
            on_batch(&cursors, p.last, true);
            ctx.emit(p).await?;
        }
        Ok(position - start)
    }

    /// The decoded rows as a batch. A snapshot read in key order takes the key as each row's
    /// position (shifted by 2^62, so keys from -2^62 to 2^62 map in order below 2^63, which
    /// `sluice_offsets` stores as bigint), so positions mean the same rows on every run.
    fn finish_batch(&self, decoder: &mut Decoder, last: u64) -> Result<(Produced, Vec<String>)> {
        let (mut p, cursors) = decoder.finish(last).map_err(|e| self.error(e))?;
        let key = self.shard_column.as_ref().filter(|_| self.cursor.is_none());
        if let (Some(key), true) = (key, p.data.num_rows() > 0) {
            let col = p.data.column_by_name(key).ok_or_else(|| self.error(format!("no column {key}")))?;
            let ints =
                arrow::compute::cast(col, &arrow::datatypes::DataType::Int64).map_err(|e| self.error(e.to_string()))?;
            let ints = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&ints);
            let shifted = |v: i64| u64::try_from(i128::from(v) + KEY_POSITION_SHIFT).ok().filter(|p| *p < 1 << 63);
            p.positions = ints
                .iter()
                .map(|v| match v {
                    None => Ok(0),
                    Some(v) => shifted(v).ok_or_else(|| {
                        self.error(format!(
                            "key {v} of column `{key}` is outside the range sluice keeps positions for (±2^62)"
                        ))
                    }),
                })
                .collect::<Result<_>>()?;
            p.first = p.positions[0];
            p.last = p.positions.iter().copied().max().unwrap_or(p.first);
        }
        Ok((p, cursors))
    }

    async fn read_incremental(&self, ctx: &ShardContext, cursor: &Cursor) -> Result<()> {
        let store = &cursor.store;
        let col = pg::quote_ident(&cursor.column);
        let stored = store.load(&ctx.shard.id).await.map_err(|e| self.error(e))?;
        tracing::info!(source = %self.id, cursor = ?stored, "incremental read resumes");
        // Positions go on from the stored one, so rows read again after a crash get the numbers
        // they had (an exactly-once sink skips by them).
        let (mut done, mut position) = match stored {
            Some((c, p)) => (Some(c), p),
            None => (None, 0),
        };
        let max_sql = format!("SELECT max({col})::text FROM {}", self.from);
        let mut samples: VecDeque<(Instant, Option<String>)> = VecDeque::new();
        loop {
            let now_max: Option<String> = {
                let client = self.client().await?;
                client
                    .query_one(max_sql.as_str(), &[])
                    .await
                    .map_err(|e| self.error(format!("polling {}: {}", self.from, pg::message(&e))))?
                    .get(0)
            };
            // The bound: the largest value seen at least `safety_margin` ago (`--bounded`: now).
            let upper = if ctx.bounded {
                now_max
            } else {
                samples.push_back((Instant::now(), now_max));
                let mut bound = None;
                while let Some((at, _)) = samples.front() {
                    if at.elapsed() < cursor.safety_margin {
                        break;
                    }
                    bound = samples.pop_front().map(|(_, v)| v);
                }
                if let Some(b) = &bound {
                    // Keep it as the oldest sample for the next poll.
                    samples.push_front((Instant::now() - cursor.safety_margin, b.clone()));
                }
                bound.flatten()
            };
            if let Some(upper) = &upper {
                let typ = &cursor.type_name;
                let lower = match &done {
                    Some(d) => format!("{col} > {}::{typ} AND ", literal(d)),
                    None => String::new(),
                };
                let sql = format!(
                    "SELECT {}, {col}::text AS \"_sluice_cursor\" FROM {} WHERE {lower}{col} <= {}::{typ} ORDER BY {col}{}",
                    self.select_list(),
                    self.from,
                    literal(upper),
                    cursor.order.iter().map(|k| format!(", {}", pg::quote_ident(k))).collect::<String>()
                );
                let mut safe = done.clone();
                let shard = ctx.shard.id.clone();
                let n = self
                    .copy_out(ctx, &sql, position, |cursors, last, is_last| {
                        if is_last {
                            // Everything up to `upper` is read once the last batch is done.
                            safe = Some(upper.clone());
                        } else if let Some(last_value) = cursors.last() {
                            // Every value before the batch's last one is complete; the last may
                            // go on in the next batch.
                            if let Some(prev) = cursors.iter().rev().find(|c| *c != last_value) {
                                safe = Some(prev.clone());
                            }
                        }
                        store.mark(&shard, last, safe.clone());
                    })
                    .await?;
                position += n;
                if ctx.cancel.is_cancelled() {
                    return Ok(());
                }
                done = Some(upper.clone());
            }
            if ctx.bounded {
                return Ok(());
            }
            // What the sinks have made durable so far (the run's end writes the rest).
            if let Err(e) = store.flush().await {
                tracing::warn!(source = %self.id, "{e}; retried at the next poll");
            }
            tokio::select! {
                _ = tokio::time::sleep(cursor.poll_interval) => {}
                _ = ctx.cancel.cancelled() => return Ok(()),
            }
        }
    }
}

/// `'text'` as an SQL literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The columns of the table's primary key, in key order (none without one).
async fn primary_key(client: &tokio_postgres::Client, table: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
             JOIN pg_attribute a ON a.attnum = k.attnum \
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary AND a.attrelid = i.indrelid ORDER BY k.n",
            &[&table],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[async_trait]
impl Source for PostgresSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    async fn shards(&self) -> Result<Vec<Arc<ShardInfo>>> {
        // Without a key, positions are row numbers in whatever order the server returns rows: the
        // shard ids then carry this run's start, so no later run takes them for its own (an
        // exactly-once sink would otherwise skip rows by numbers that mean other rows).
        let nonce = if self.shard_column.is_some() || self.cursor.is_some() {
            String::new()
        } else {
            format!("@{}", self.run_started)
        };
        let shard = |id: String| {
            Arc::new(ShardInfo {
                source: self.id.clone(),
                id: format!("{id}{nonce}"),
                kind: ShardKind::Sequence,
                epoch: None,
            })
        };
        if self.shards == 1 {
            return Ok(vec![shard("all".into())]);
        }
        // Bounds are fixed when the shards are listed; the last shard is open-ended.
        let client = self.client().await?;
        let n = self.shards as i64;
        let bounds: Vec<String> = match &self.shard_column {
            Some(c) => {
                let c = pg::quote_ident(c);
                let row = client
                    .query_one(&format!("SELECT min({c})::int8, max({c})::int8 FROM {}", self.from), &[])
                    .await
                    .map_err(|e| self.error(format!("reading the range of {c}: {}", pg::message(&e))))?;
                let (lo, hi): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
                let (lo, hi) = (lo.unwrap_or(0), hi.unwrap_or(0));
                let step = ((hi as i128 - lo as i128) / n as i128 + 1) as i64;
                (1..n).map(|i| (lo + step * i).to_string()).collect()
            }
            None => {
                let row = client
                    .query_one(
                        "SELECT (pg_relation_size(to_regclass($1)) / current_setting('block_size')::int8)::int8",
                        &[&self.from],
                    )
                    .await
                    .map_err(|e| self.error(format!("reading the size of {}: {}", self.from, pg::message(&e))))?;
                let pages: i64 = row.get(0);
                let step = pages / n + 1;
                (1..n).map(|i| (step * i).to_string()).collect()
            }
        };
        let mut out = Vec::new();
        for i in 0..self.shards {
            let lo = if i == 0 { "-".to_string() } else { bounds[i - 1].clone() };
            let hi = if i + 1 == self.shards { "-".to_string() } else { bounds[i].clone() };
            out.push(shard(format!("{i}:{lo}:{hi}")));
        }
        Ok(out)
    }

    async fn read_shard(&self, ctx: ShardContext) -> Result<()> {
        if let Some(cursor) = &self.cursor {
            return self.read_incremental(&ctx, cursor).await;
        }
        let id = ctx.shard.id.split('@').next().unwrap_or_default();
        let mut parts = id.splitn(3, ':');
        let (_, lo, hi) = (parts.next(), parts.next(), parts.next());
        let mut conds = Vec::new();
        match &self.shard_column {
            Some(c) => {
                let c = pg::quote_ident(c);
                match lo {
                    Some(lo) if lo != "-" => conds.push(format!("{c} >= {lo}")),
                    // The first shard takes the rows without a key too.
                    Some(_) => {
                        if let Some(hi) = hi.filter(|h| *h != "-") {
                            conds.push(format!("({c} < {hi} OR {c} IS NULL)"));
                        }
                    }
                    None => {}
                }
                if let (Some(lo), Some(hi)) = (lo, hi) {
                    if lo != "-" && hi != "-" {
                        conds.push(format!("{c} < {hi}"));
                    }
                }
            }
            None if self.is_table && lo.is_some() => {
                if let Some(lo) = lo.filter(|l| *l != "-") {
                    conds.push(format!("ctid >= '({lo},0)'::tid"));
                }
                if let Some(hi) = hi.filter(|h| *h != "-") {
                    conds.push(format!("ctid < '({hi},0)'::tid"));
                }
            }
            None => {}
        }
        let filter = if conds.is_empty() { String::new() } else { format!(" WHERE {}", conds.join(" AND ")) };
        let order = match &self.shard_column {
            Some(c) => format!(" ORDER BY {} NULLS FIRST", pg::quote_ident(c)),
            None => String::new(),
        };
        let sql = format!("SELECT {} FROM {}{filter}{order}", self.select_list(), self.from);
        tracing::debug!(source = %self.id, shard = %ctx.shard.id, %sql, "reading");
        self.copy_out(&ctx, &sql, 0, |_, _, _| {}).await.map(|_| ())
    }

    fn committer(&self) -> Arc<dyn PositionCommitter> {
        self.committer.clone()
    }
}

/// Incremental positions: which cursor value each batch's last position may commit, and the
/// table they are written to.
struct CursorStore {
    pool: Pool,
    table: String,
    pipeline: String,
    source: String,
    /// (shard, position) → the cursor value complete once that position is done.
    marks: Mutex<BTreeMap<(String, u64), Option<String>>>,
    /// The newest committed (shard, value, position), not yet written.
    latest: Mutex<Option<(String, String, u64)>>,
    /// The one last written (so a flush writes only what changed).
    written: tokio::sync::Mutex<Option<(String, String, u64)>>,
    /// Worker mode: the epoch of the grant each shard is read under ([`ShardInfo::epoch`]),
    /// checked again when its position is written.
    read_at: Mutex<HashMap<String, u64>>,
}

impl CursorStore {
    async fn ensure_table(&self, client: &tokio_postgres::Client) -> Result<(), String> {
        pg::ensure_table(
            client,
            &self.table,
            "pipeline text NOT NULL, source text NOT NULL, shard text NOT NULL, cursor text NOT NULL, \
             position bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now(), \
             PRIMARY KEY (pipeline, source, shard)",
            "position bigint NOT NULL DEFAULT 0",
        )
        .await
        .map_err(|e| format!("creating the positions table {}: {}", self.table, pg::message(&e)))
    }

    async fn load(&self, shard: &str) -> Result<Option<(String, u64)>, String> {
        let client = self.pool.get().await.map_err(|e| pg::pool_error(&e, "the source database"))?;
        self.ensure_table(&client).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT cursor, position FROM {} WHERE pipeline = $1 AND source = $2 AND shard = $3",
                    self.table
                ),
                &[&self.pipeline, &self.source, &shard],
            )
            .await
            .map_err(|e| format!("reading the position from {}: {}", self.table, pg::message(&e)))?;
        Ok(rows.first().map(|r| (r.get(0), r.get::<_, i64>(1) as u64)))
    }

    fn mark(&self, shard: &str, position: u64, value: Option<String>) {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).insert((shard.to_string(), position), value);
    }

    async fn write(&self, shard: &str, value: &str, position: u64) -> Result<(), String> {
        let client = self.pool.get().await.map_err(|e| pg::pool_error(&e, "the source database"))?;
        client
            .execute(
                &format!(
                    "INSERT INTO {} (pipeline, source, shard, cursor, position) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (pipeline, source, shard) DO UPDATE \
                     SET cursor = EXCLUDED.cursor, position = EXCLUDED.position, updated_at = now()",
                    self.table
                ),
                &[&self.pipeline, &self.source, &shard, &value, &(position as i64)],
            )
            .await
            .map_err(|e| format!("writing the position to {}: {}", self.table, pg::message(&e)))?;
        Ok(())
    }
}

#[async_trait]
impl PositionCommitter for CursorStore {
    fn commit(&self, shard: &ShardInfo, position: u64) {
        if let Err(why) = crate::fence::check(shard) {
            tracing::warn!(source = %self.source, "not committing cursor position {position} of {}: fenced: {why}", shard.id);
            return;
        }
        if let Some(epoch) = shard.epoch {
            self.read_at.lock().unwrap_or_else(|e| e.into_inner()).insert(shard.id.clone(), epoch);
        }
        let value = {
            let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
            let key = (shard.id.clone(), position);
            let value = marks.get(&key).cloned().flatten();
            // Marks at or before the committed position are no longer needed.
            let keep = marks.split_off(&(shard.id.clone(), position + 1));
            *marks = keep;
            value
        };
        if let Some(v) = value {
            *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some((shard.id.clone(), v, position));
            metrics::counter!(names::COMMITS_TOTAL, "component" => shard.source.clone()).increment(1);
        }
    }

    async fn flush(&self) -> Result<()> {
        let latest = self.latest_value();
        let mut written = self.written.lock().await;
        if latest.is_some() && *written != latest {
            if let Some((shard, value, position)) = &latest {
                let read_at = self.read_at.lock().unwrap_or_else(|e| e.into_inner()).get(shard).copied();
                if let Err(why) = crate::fence::check_id(&self.source, shard, read_at) {
                    return Err(Error::Fenced { component: self.source.clone(), message: why });
                }
                self.write(shard, value, *position)
                    .await
                    .map_err(|message| Error::Service { component: self.source.clone(), message })?;
            }
            *written = latest;
        }
        Ok(())
    }
}

impl CursorStore {
    fn latest_value(&self) -> Option<(String, String, u64)> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What decoding one row from the buffer gave.
enum Row {
    Decoded,
    /// The buffer ends inside the row: more bytes are needed.
    Incomplete,
    /// The stream's trailer.
    End,
}

/// Binary COPY → Arrow builders.
struct Decoder {
    schema: SchemaRef,
    kinds: Vec<PgKind>,
    builders: Vec<Builder>,
    with_cursor: bool,
    cursors: Vec<String>,
    positions: Vec<u64>,
    bad: Vec<BadRecord>,
    /// Whether each column may hold nulls.
    nullable: Vec<bool>,
    /// (start, length or -1) of each field of the row being decoded.
    spans: Vec<(usize, i32)>,
    /// Builder rows (indexes into `positions`) of rows that failed part way.
    dropped: Vec<usize>,
    header_done: bool,
    first: Option<u64>,
    raw_bytes: usize,
}

/// A decoded field, before it is appended (a row is appended only when all its fields decode).
enum Val<'a> {
    Null,
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Dec(i128),
    Str(&'a str),
    Owned(String),
    Bytes(&'a [u8]),
    List(Vec<Val<'a>>),
}

enum Builder {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Dec(Decimal128Builder, u8, i8),
    Str(StringBuilder),
    Bytes(BinaryBuilder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder, Option<Arc<str>>),
    Time(Time64MicrosecondBuilder),
    List(ListBuilder<Box<dyn ArrayBuilder>>),
}

impl Builder {
    fn new(kind: &PgKind, cap: usize) -> Builder {
        match kind {
            PgKind::Bool => Builder::Bool(BooleanBuilder::with_capacity(cap)),
            PgKind::Int2 => Builder::I16(Int16Builder::with_capacity(cap)),
            PgKind::Int4 => Builder::I32(Int32Builder::with_capacity(cap)),
            PgKind::Int8 => Builder::I64(Int64Builder::with_capacity(cap)),
            PgKind::Float4 => Builder::F32(Float32Builder::with_capacity(cap)),
            PgKind::Float8 => Builder::F64(Float64Builder::with_capacity(cap)),
            PgKind::Numeric(_) => {
                let arrow::datatypes::DataType::Decimal128(p, s) = kind.arrow_type() else { unreachable!() };
                Builder::Dec(Decimal128Builder::with_capacity(cap), p, s)
            }
            PgKind::Text | PgKind::Json | PgKind::Jsonb | PgKind::Uuid => {
                Builder::Str(StringBuilder::with_capacity(cap, cap * 16))
            }
            PgKind::Bytea => Builder::Bytes(BinaryBuilder::with_capacity(cap, cap * 16)),
            PgKind::Date => Builder::Date(Date32Builder::with_capacity(cap)),
            PgKind::Timestamp => Builder::Ts(TimestampMicrosecondBuilder::with_capacity(cap), None),
            PgKind::Timestamptz => Builder::Ts(TimestampMicrosecondBuilder::with_capacity(cap), Some("UTC".into())),
            PgKind::Time => Builder::Time(Time64MicrosecondBuilder::with_capacity(cap)),
            PgKind::Array(elem, _) => {
                let values = arrow::array::make_builder(&elem.arrow_type(), cap);
                let values: Box<dyn ArrayBuilder> = match elem.as_ref() {
                    PgKind::Numeric(_) => {
                        let arrow::datatypes::DataType::Decimal128(p, s) = elem.arrow_type() else { unreachable!() };
                        Box::new(Decimal128Builder::with_capacity(cap).with_precision_and_scale(p, s).expect("valid"))
                    }
                    PgKind::Timestamptz => {
                        Box::new(TimestampMicrosecondBuilder::with_capacity(cap).with_timezone("UTC"))
                    }
                    _ => values,
                };
                Builder::List(ListBuilder::new(values))
            }
        }
    }

    fn append(&mut self, v: &Val) {
        match (self, v) {
            (b, Val::Null) => b.append_null(),
            (Builder::Bool(b), Val::Bool(x)) => b.append_value(*x),
            (Builder::I16(b), Val::I16(x)) => b.append_value(*x),
            (Builder::I32(b), Val::I32(x)) => b.append_value(*x),
            (Builder::I64(b), Val::I64(x)) => b.append_value(*x),
            (Builder::F32(b), Val::F32(x)) => b.append_value(*x),
            (Builder::F64(b), Val::F64(x)) => b.append_value(*x),
            (Builder::Dec(b, ..), Val::Dec(x)) => b.append_value(*x),
            (Builder::Str(b), Val::Str(s)) => b.append_value(s),
            (Builder::Str(b), Val::Owned(s)) => b.append_value(s),
            (Builder::Bytes(b), Val::Bytes(x)) => b.append_value(x),
            (Builder::Date(b), Val::I32(x)) => b.append_value(*x),
            (Builder::Ts(b, _), Val::I64(x)) => b.append_value(*x),
            (Builder::Time(b), Val::I64(x)) => b.append_value(*x),
            (Builder::List(b), Val::List(items)) => {
                for item in items {
                    append_dyn(b.values(), item);
                }
                b.append(true);
            }
            (b, _) => b.append_null(),
        }
    }

    /// Decodes one binary field straight into the builder.
    fn append_raw(&mut self, kind: &PgKind, raw: &[u8]) -> Result<(), String> {
        match self {
            Builder::I64(b) => b.append_value(be_i64(raw)?),
            Builder::I32(b) => b.append_value(be_i32(raw)?),
            Builder::I16(b) => b.append_value(be_i16(raw)?),
            Builder::F64(b) => b.append_value(f64::from_bits(be_i64(raw)? as u64)),
            Builder::F32(b) => b.append_value(f32::from_bits(be_i32(raw)? as u32)),
            Builder::Bool(b) => b.append_value(raw.first().copied().unwrap_or(0) != 0),
            Builder::Str(b) if matches!(kind, PgKind::Text | PgKind::Json) => {
                b.append_value(std::str::from_utf8(raw).map_err(|e| e.to_string())?)
            }
            Builder::Bytes(b) => b.append_value(raw),
            _ => {
                let v = decode(kind, raw)?;
                self.append(&v);
            }
        }
        Ok(())
    }

    fn append_null(&mut self) {
        match self {
            Builder::Bool(b) => b.append_null(),
            Builder::I16(b) => b.append_null(),
            Builder::I32(b) => b.append_null(),
            Builder::I64(b) => b.append_null(),
            Builder::F32(b) => b.append_null(),
            Builder::F64(b) => b.append_null(),
            Builder::Dec(b, ..) => b.append_null(),
            Builder::Str(b) => b.append_null(),
            Builder::Bytes(b) => b.append_null(),
            Builder::Date(b) => b.append_null(),
            Builder::Ts(b, _) => b.append_null(),
            Builder::Time(b) => b.append_null(),
            Builder::List(b) => b.append(false),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::I16(b) => Arc::new(b.finish()),
            Builder::I32(b) => Arc::new(b.finish()),
            Builder::I64(b) => Arc::new(b.finish()),
            Builder::F32(b) => Arc::new(b.finish()),
            Builder::F64(b) => Arc::new(b.finish()),
            Builder::Dec(b, p, s) => Arc::new(b.finish().with_precision_and_scale(*p, *s).expect("valid precision")),
            Builder::Str(b) => Arc::new(b.finish()),
            Builder::Bytes(b) => Arc::new(b.finish()),
            Builder::Date(b) => Arc::new(b.finish()),
            Builder::Ts(b, tz) => Arc::new(b.finish().with_timezone_opt(tz.clone())),
            Builder::Time(b) => Arc::new(b.finish()),
            Builder::List(b) => Arc::new(b.finish()),
        }
    }
}

/// Appends a list element to a type-erased values builder.
fn append_dyn(b: &mut Box<dyn ArrayBuilder>, v: &Val) {
    let any = b.as_any_mut();
    macro_rules! prim {
        ($t:ty, $x:expr) => {
            if let Some(b) = any.downcast_mut::<$t>() {
                b.append_value($x);
                return;
            }
        };
    }
    match v {
        Val::Bool(x) => prim!(BooleanBuilder, *x),
        Val::I16(x) => prim!(Int16Builder, *x),
        Val::I32(x) => {
            prim!(Int32Builder, *x);
            prim!(Date32Builder, *x);
        }
        Val::I64(x) => {
            prim!(Int64Builder, *x);
            prim!(TimestampMicrosecondBuilder, *x);
            prim!(Time64MicrosecondBuilder, *x);
        }
        Val::F32(x) => prim!(Float32Builder, *x),
        Val::F64(x) => prim!(Float64Builder, *x),
        Val::Dec(x) => prim!(Decimal128Builder, *x),
        Val::Str(s) => prim!(StringBuilder, *s),
        Val::Owned(s) => prim!(StringBuilder, s.as_str()),
        Val::Bytes(x) => prim!(BinaryBuilder, *x),
        _ => {}
    }
    // Null (or a type the element builder does not take).
    macro_rules! null {
        ($($t:ty),*) => {
            $(if let Some(b) = any.downcast_mut::<$t>() { b.append_null(); return; })*
        };
    }
    null!(
        BooleanBuilder,
        Int16Builder,
        Int32Builder,
        Int64Builder,
        Float32Builder,
        Float64Builder,
        Decimal128Builder,
        StringBuilder,
        BinaryBuilder,
        Date32Builder,
        TimestampMicrosecondBuilder,
        Time64MicrosecondBuilder
    );
}

/// Removes the items at `dropped` indexes.
fn drop_rows<T>(v: &mut Vec<T>, dropped: &std::collections::HashSet<usize>) {
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        !dropped.contains(&(i - 1))
    });
}

fn be_i16(b: &[u8]) -> Result<i16, String> {
    Ok(i16::from_be_bytes(b.try_into().map_err(|_| "wrong length for int2")?))
}
fn be_i32(b: &[u8]) -> Result<i32, String> {
    Ok(i32::from_be_bytes(b.try_into().map_err(|_| "wrong length for a 4-byte value")?))
}
fn be_i64(b: &[u8]) -> Result<i64, String> {
    Ok(i64::from_be_bytes(b.try_into().map_err(|_| "wrong length for an 8-byte value")?))
}

/// Decodes one binary field of `kind`.
fn decode<'a>(kind: &PgKind, raw: &'a [u8]) -> Result<Val<'a>, String> {
    Ok(match kind {
        PgKind::Bool => Val::Bool(raw.first().copied().unwrap_or(0) != 0),
        PgKind::Int2 => Val::I16(be_i16(raw)?),
        PgKind::Int4 => Val::I32(be_i32(raw)?),
        PgKind::Int8 => Val::I64(be_i64(raw)?),
        PgKind::Float4 => Val::F32(f32::from_bits(be_i32(raw)? as u32)),
        PgKind::Float8 => Val::F64(f64::from_bits(be_i64(raw)? as u64)),
        PgKind::Numeric(_) => {
            let arrow::datatypes::DataType::Decimal128(_, s) = kind.arrow_type() else { unreachable!() };
            Val::Dec(pg::decode_numeric(raw, s)?)
        }
        PgKind::Text | PgKind::Json => Val::Str(std::str::from_utf8(raw).map_err(|e| e.to_string())?),
        PgKind::Jsonb => Val::Str(std::str::from_utf8(raw.get(1..).unwrap_or_default()).map_err(|e| e.to_string())?),
        PgKind::Uuid => {
            if raw.len() != 16 {
                return Err("a uuid of the wrong length".into());
            }
            let h: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            Val::Owned(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
        }
        PgKind::Bytea => Val::Bytes(raw),
        PgKind::Date => {
            let d = be_i32(raw)?;
            if d == i32::MAX || d == i32::MIN {
                return Err("an infinite date has no Arrow value".into());
            }
            Val::I32(d.checked_add(pg::PG_EPOCH_DAYS).ok_or("date out of range")?)
        }
        PgKind::Timestamp | PgKind::Timestamptz => {
            let t = be_i64(raw)?;
            if t == i64::MAX || t == i64::MIN {
                return Err("an infinite timestamp has no Arrow value".into());
            }
            Val::I64(t.checked_add(pg::PG_EPOCH_MICROS).ok_or("timestamp out of range")?)
        }
        PgKind::Time => Val::I64(be_i64(raw)?),
        PgKind::Array(elem, _) => {
            if raw.len() < 12 {
                return Err("truncated array".into());
            }
            let ndim = be_i32(&raw[0..4])?;
            if ndim == 0 {
                return Ok(Val::List(Vec::new()));
            }
            if ndim != 1 {
                return Err(format!("a {ndim}-dimensional array; only one dimension is read"));
            }
            let n = be_i32(raw.get(12..16).ok_or("truncated array")?)?;
            let n = usize::try_from(n).map_err(|_| "an array of negative size")?.min(raw.len() / 4);
            let mut at = 20;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                let len = be_i32(raw.get(at..at + 4).ok_or("truncated array")?)?;
                at += 4;
                if len < 0 {
                    items.push(Val::Null);
                    continue;
                }
                let item = raw.get(at..at + len as usize).ok_or("truncated array")?;
                at += len as usize;
                items.push(decode(elem, item)?);
            }
            Val::List(items)
        }
    })
}

impl Decoder {
    fn new(schema: &SchemaRef, columns: &[PgColumn], with_cursor: bool, cap: usize) -> Decoder {
        let kinds: Vec<PgKind> = columns.iter().map(|c| c.kind.clone().expect("checked at build")).collect();
        Decoder {
            schema: schema.clone(),
            builders: kinds.iter().map(|k| Builder::new(k, cap)).collect(),
            kinds,
            with_cursor,
            cursors: Vec::new(),
            positions: Vec::with_capacity(cap),
            bad: Vec::new(),
            nullable: schema.fields().iter().map(|f| f.is_nullable()).collect(),
            spans: Vec::new(),
            dropped: Vec::new(),
            header_done: false,
            first: None,
            raw_bytes: 0,
        }
    }

    fn rows(&self) -> usize {
        self.positions.len()
    }

    fn has_bad(&self) -> bool {
        !self.bad.is_empty()
    }

    /// Decodes the row at the front of `buf` as position `position`; returns what it found and
    /// how many bytes it took (none when the row is incomplete).
    fn next_row(&mut self, buf: &[u8], position: u64) -> Result<(Row, usize), String> {
        let mut skip = 0;
        if !self.header_done {
            if buf.len() < 19 {
                return Ok((Row::Incomplete, 0));
            }
            if &buf[..11] != b"PGCOPY\n\xff\r\n\0" {
                return Err("the server's COPY output is not binary COPY".into());
            }
            let ext = be_i32(&buf[15..19])? as usize;
            if buf.len() < 19 + ext {
                return Ok((Row::Incomplete, 0));
            }
            self.header_done = true;
            skip = 19 + ext;
        }
        let buf = &buf[skip..];
        if buf.len() < 2 {
            return Ok((Row::Incomplete, skip));
        }
        let nfields = be_i16(&buf[..2])?;
        if nfields == -1 {
            return Ok((Row::End, skip + 2));
        }
        let want = self.kinds.len() + usize::from(self.with_cursor);
        if nfields as usize != want {
            return Err(format!("a row of {nfields} fields where {want} were expected"));
        }
        // First the row's fields (is all of it here?), then decode.
        let mut at = 2;
        self.spans.clear();
        for _ in 0..want {
            if buf.len() < at + 4 {
                return Ok((Row::Incomplete, skip));
            }
            let len = i32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
            at += 4;
            if len < 0 {
                self.spans.push((at, -1));
                continue;
            }
            if buf.len() < at + len as usize {
                return Ok((Row::Incomplete, skip));
            }
            self.spans.push((at, len));
            at += len as usize;
        }
        let row = &buf[..at];
        self.raw_bytes += at;
        self.first.get_or_insert(position);
        if let Some(i) = (0..self.kinds.len()).find(|i| self.spans[*i].1 < 0 && !self.nullable[*i]) {
            let error = format!("column `{}`: a null in a not-null column", self.schema.field(i).name());
            self.bad.push(BadRecord {
                position: Some(position),
                stage: Stage::Convert,
                error,
                raw: row.to_vec(),
                key: None,
            });
            return Ok((Row::Decoded, skip + at));
        }
        let mut failed = None;
        for (i, (b, kind)) in self.builders.iter_mut().zip(&self.kinds).enumerate() {
            let (start, len) = self.spans[i];
            if failed.is_some() || len < 0 {
                b.append_null();
                continue;
            }
            if let Err(e) = b.append_raw(kind, &row[start..start + len as usize]) {
                failed = Some(format!("column `{}`: {e}", self.schema.field(i).name()));
                b.append_null();
            }
        }
        if let Some(error) = failed {
            // The row's slots in the builders are taken out when the batch is finished.
            self.dropped.push(self.positions.len());
            self.bad.push(BadRecord {
                position: Some(position),
                stage: Stage::Convert,
                error,
                raw: row.to_vec(),
                key: None,
            });
        }
        if self.with_cursor {
            let (start, len) = self.spans[self.kinds.len()];
            let cursor = if len < 0 {
                String::new()
            } else {
                String::from_utf8_lossy(&row[start..start + len as usize]).into_owned()
            };
            self.cursors.push(cursor);
        }
        self.positions.push(position);
        Ok((Row::Decoded, skip + at))
    }

    /// The rows decoded so far, up to `last`, as one batch; the decoder starts over.
    fn finish(&mut self, last: u64) -> Result<(Produced, Vec<String>), String> {
        let mut columns: Vec<ArrayRef> = self.builders.iter_mut().map(Builder::finish).collect();
        let mut positions = std::mem::take(&mut self.positions);
        let mut cursors = std::mem::take(&mut self.cursors);
        if !self.dropped.is_empty() {
            // Rows that failed part way: their slots are taken out of every column.
            let dropped: std::collections::HashSet<usize> = std::mem::take(&mut self.dropped).into_iter().collect();
            let keep: arrow::array::BooleanArray = (0..positions.len()).map(|i| Some(!dropped.contains(&i))).collect();
            columns = columns
                .iter()
                .map(|c| arrow::compute::filter(c.as_ref(), &keep))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            drop_rows(&mut positions, &dropped);
            drop_rows(&mut cursors, &dropped);
        }
        let data = RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| e.to_string())?;
        let p = Produced {
            data,
            positions,
            bad: std::mem::take(&mut self.bad),
            first: self.first.take().unwrap_or(last),
            last,
            raw_bytes: std::mem::take(&mut self.raw_bytes),
        };
        Ok((p, cursors))
    }
}
