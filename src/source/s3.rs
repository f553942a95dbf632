//! The `s3` source: Parquet, NDJSON or CSV objects (gzip too) under a prefix of an S3-compatible
//! bucket, one shard per object.
//!
//! Each object is downloaded to an anonymous temporary file (memory stays bounded whatever its
//! size) and read with the `file` source's readers; positions are 1-based line numbers (record
//! numbers for Parquet), as for files.
//!
//! Positions live in the bucket, one small object per data object, under the state prefix
//! (default `_sluice/{pipeline}/{source}/`, never read as data):
//! - `progress/{key}`: JSON with the ETag read, the last committed position and, once the object
//!   was read to its end, its last position; written about every second while it changes and at
//!   the end of a run, and read when the object is read again (it resumes after the committed
//!   position, or from the start when the object was rewritten since: another ETag);
//! - `done/{etag}/{key}`: an empty marker written once every record of the object is committed
//!   (the progress object is then deleted). Listing `done/` tells which objects to skip without
//!   reading any state object (a `sluice run` reads a fresh object with one GET and marks it
//!   with one PUT); under the coordinator an object granted again (a worker's next generation)
//!   is skipped once its ETag (a HEAD request, before any download) has a marker.
//!
//! Each object's state is written only by the process reading it, so workers sharing a source
//! under the coordinator never overwrite each other's positions; in worker mode each write is
//! fenced by the epoch of the grant the object was read under.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::file::{infer_from, open_reader, FileFormat, SchemaSpec};
use super::{Produced, ShardContext, Source};
use crate::batch::{PositionCommitter, ShardInfo, ShardKind};
use crate::config::types::schema_from_columns;
use crate::config::HumanDuration;
use crate::observe::names;
use crate::s3::{describe_error, service, Connection, SecretString};
use crate::{Error, Result};

/// Bytes read from the start of the first object to infer a JSON or CSV schema.
const INFER_BYTES: u64 = 1 << 20;
/// Bytes read from the end of a Parquet object to find its schema (more when its footer is larger).
const FOOTER_GUESS: u64 = 64 << 10;
/// How often changed positions are written.
const STATE_INTERVAL: Duration = Duration::from_secs(1);
/// Done markers deleted at most per listing (see `collect_garbage`).
const MARKERS_DELETED_PER_LISTING: usize = 1000;
/// Progress objects written at once.
const WRITE_CONCURRENCY: usize = 16;

/// `[sources.ID] type = "s3"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3SourceConfig {
    pub bucket: String,
    /// Key prefix listed (default: the whole bucket).
    #[serde(default)]
    pub prefix: String,
    /// A glob the keys must match, e.g. `orders/**/*.parquet` (`*` stays within one `/` level).
    pub pattern: Option<String>,
    /// How the objects are encoded.
    pub format: FileFormat,
    /// As for the `file` source: columns and SQL types, or `"infer"` (JSON, CSV); Parquet objects
    /// carry their schema.
    pub schema: Option<SchemaSpec>,
    /// Prefix of the objects holding the source's positions (default `_sluice/{pipeline}/{source id}/`).
    pub state_prefix: Option<String>,
    /// The one state object of earlier builds (default `_sluice/{pipeline}/{source id}.json`),
    /// moved to per-object state under `state_prefix` by the first listing.
    pub state_key: Option<String>,
    /// List the prefix again at this interval and read new objects (runs without `--bounded`).
    pub poll_interval: Option<HumanDuration>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    pub max_attempts: Option<u32>,
    pub request_timeout: Option<HumanDuration>,
    /// Where objects are downloaded while read (default: the system's temporary directory).
    pub download_dir: Option<PathBuf>,
}

impl S3SourceConfig {
    fn connection(&self) -> Connection {
        Connection {
            bucket: self.bucket.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            force_path_style: self.force_path_style,
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.as_ref().map(|s| s.0.clone()),
            max_attempts: self.max_attempts.unwrap_or(crate::s3::DEFAULT_MAX_ATTEMPTS),
            request_timeout: self.request_timeout.map_or(crate::s3::DEFAULT_REQUEST_TIMEOUT, |d| d.0),
        }
    }
}

/// Reads objects as shards.
pub struct S3Source {
    id: String,
    connection: Connection,
    client: Client,
    prefix: String,
    pattern: Option<glob::Pattern>,
    format: FileFormat,
    schema: SchemaRef,
    cast_to: Option<SchemaRef>,
    poll_interval: Option<Duration>,
    download_dir: PathBuf,
    state: Arc<ObjectState>,
    /// Keys the coordinator's listing returned before (see `list_shards`).
    listed: Mutex<HashSet<String>>,
    /// Done markers the last listing found without their object (see `collect_garbage`).
    orphans: Mutex<HashSet<String>>,
}

impl S3Source {
    /// Checks the settings and resolves the schema (reading the first object when it is not
    /// declared).
    ///
    /// # Errors
    /// `(key, message)` naming the setting at fault, or the service problem under `bucket`.
    pub async fn new(id: &str, pipeline: &str, config: &S3SourceConfig) -> Result<Self, (&'static str, String)> {
        let connection = config.connection();
        connection.validate()?;
        let pattern = match &config.pattern {
            Some(p) => Some(glob::Pattern::new(p).map_err(|e| ("pattern", format!("`{p}` is not a valid glob: {e}")))?),
            None => None,
        };
        let mut state_prefix = config
            .state_prefix
            .clone()
            .unwrap_or_else(|| format!("_sluice/{pipeline}/{id}/"))
            .trim_start_matches('/')
            .to_string();
        if state_prefix.is_empty() {
            return Err(("state_prefix", "must not be empty: positions need a prefix of their own".into()));
        }
        if !state_prefix.ends_with('/') {
            state_prefix.push('/');
        }
        let prefix = config.prefix.trim_start_matches('/').to_string();
        if prefix.starts_with(&state_prefix) {
            return Err((
                "state_prefix",
                format!(
                    "`{state_prefix}` holds the listed prefix `{prefix}`, so every object would be taken for positions \
                     and none read; choose a state_prefix outside it (the default is under `_sluice/`)"
                ),
            ));
        }
        let client = connection.client().await;
        let declared = match &config.schema {
            Some(SchemaSpec::Columns(cols)) => {
                Some(schema_from_columns(cols).map_err(|(col, m)| ("schema", format!("column `{col}`: {m}")))?)
            }
            _ => None,
        };
        let needs_sample = match (&config.format, &config.schema) {
            (_, Some(SchemaSpec::Columns(_))) => false,
            (FileFormat::Parquet(_), _) | (_, Some(SchemaSpec::Infer)) => true,
            (_, None) => {
                return Err((
                    "schema",
                    "JSON and CSV objects need a schema: add [sources.ID.schema] with `column = \"sql type\"` lines, or schema = \"infer\"".into(),
                ))
            }
        };
        let (schema, cast_to) = if needs_sample {
            let keys = list(id, &client, &connection, &prefix, pattern.as_ref(), &state_prefix)
                .await
                .map_err(|e| ("bucket", e.to_string()))?;
            let Some((first, _)) = keys.first() else {
                return Err((
                    "schema",
                    format!(
                        "no objects under `{prefix}` in {} to read a schema from; declare the schema",
                        connection.describe()
                    ),
                ));
            };
            let sample = match &config.format {
                FileFormat::Parquet(_) => parquet_schema(&client, &connection, first).await,
                format => text_schema(&client, &connection, first, format).await,
            };
            (sample.map_err(|m| ("schema", m))?, None)
        } else {
            let s = declared.expect("declared when no sample is needed");
            match config.format {
                FileFormat::Parquet(_) => (s.clone(), Some(s)),
                _ => (s, None),
            }
        };
        let state = Arc::new(ObjectState {
            component: id.to_string(),
            connection: connection.clone(),
            prefix: state_prefix,
            client: OnceLock::new(),
            objects: Mutex::default(),
            dirty: Mutex::default(),
            with_progress: Mutex::default(),
            writing: tokio::sync::Mutex::new(()),
            legacy: config.state_key.clone().unwrap_or_else(|| format!("_sluice/{pipeline}/{id}.json")),
            check: crate::fence::check,
            migrated: tokio::sync::OnceCell::new(),
        });
        Ok(S3Source {
            id: id.to_string(),
            connection,
            client,
            prefix,
            pattern,
            format: config.format.clone(),
            schema,
            cast_to,
            poll_interval: config.poll_interval.map(|d| d.0),
            download_dir: config.download_dir.clone().unwrap_or_else(std::env::temp_dir),
            state,
            listed: Mutex::default(),
            orphans: Mutex::default(),
        })
    }

    /// Downloads `key` into an anonymous temporary file; returns it with the ETag of what was read.
    async fn download(&self, key: &str) -> Result<(std::fs::File, String)> {
        let out = self
            .client
            .get_object()
            .bucket(&self.connection.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.error(key, "cannot read", describe_error(&e)))?;
        let etag = bare_etag(out.e_tag().unwrap_or_default()).to_string();
        let dir = self.download_dir.clone();
        let mut file =
            tempfile::tempfile_in(&dir).map_err(|e| Error::io("cannot create a download file in", &dir, e))?;
        let mut body = out.body;
        loop {
            match body.try_next().await {
                Ok(Some(chunk)) => {
                    file.write_all(&chunk).map_err(|e| Error::io("cannot write a download file in", &dir, e))?
                }
                Ok(None) => break,
                Err(e) => return Err(self.error(key, "cannot read", e.to_string())),
            }
        }
        use std::io::Seek;
        file.rewind().map_err(|e| Error::io("cannot rewind a download file in", &dir, e))?;
        Ok((file, etag))
    }

    /// The objects to read: all listed but those marked done, and with `sticky`, those returned
    /// by an earlier call with `sticky` too.
    async fn listing(&self, sticky: bool) -> Result<Vec<Arc<ShardInfo>>> {
        let keys =
            list(&self.id, &self.client, &self.connection, &self.prefix, self.pattern.as_ref(), &self.state.prefix)
                .await?;
        self.state.migrated.get_or_try_init(|| self.state.migrate(&self.client)).await?;
        let done = self.state.done(&self.client).await?;
        self.collect_garbage(&keys, &done).await;
        if !sticky {
            // What `open` needs in a `sluice run`; workers read each progress object instead.
            let with_progress: HashSet<String> =
                self.state.keys_under(&self.client, "progress/").await?.into_iter().collect();
            *self.state.with_progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(with_progress);
        }
        let mut listed = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<(String, String)> = keys
            .into_iter()
            .filter(|(key, etag)| {
                !done.get(key).is_some_and(|etags| etags.contains(etag)) || (sticky && listed.contains(key))
            })
            .collect();
        if sticky {
            // Only keys still in the bucket are remembered.
            *listed = keys.iter().map(|(key, _)| key.clone()).collect();
        }
        let bucket = &self.connection.bucket;
        Ok(keys
            .into_iter()
            .map(|(key, etag)| {
                Arc::new(ShardInfo {
                    source: self.id.clone(),
                    kind: ShardKind::File { path: format!("s3://{bucket}/{key}"), version: Some(etag) },
                    id: key,
                    epoch: None,
                })
            })
            .collect())
    }

    fn error(&self, key: &str, what: &str, detail: String) -> Error {
        service(&self.id, format!("{what} s3://{}/{key}: {detail}", self.connection.bucket))
    }

    /// Deletes the done markers of objects that two listings in a row did not find (deleted, or
    /// rewritten since: another ETag). A landing prefix whose objects are removed once read kept
    /// a marker per object ever, and every listing read them all. Two listings, because a marker
    /// can be written between a listing's objects and its markers (an object listed and read
    /// meanwhile by another process); the next listing finds that object. Failures are logged
    /// and tried again at the next listing.
    async fn collect_garbage(&self, keys: &[(String, String)], done: &HashMap<String, HashSet<String>>) {
        let listed: HashSet<(&str, &str)> = keys.iter().map(|(k, e)| (k.as_str(), e.as_str())).collect();
        // Only markers of keys this listing could have returned: another source (or pipeline)
        // given the same `state_prefix` keeps its own.
        let missed: HashSet<String> = done
            .iter()
            .filter(|(key, _)| key.starts_with(&self.prefix) && matches(self.pattern.as_ref(), key))
            .flat_map(|(key, etags)| {
                etags
                    .iter()
                    .filter(|e| !listed.contains(&(key.as_str(), e.as_str())))
                    .map(|e| self.state.done_key(key, e))
            })
            .collect();
        let doomed: Vec<String> = {
            let mut last = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
            // A bounded number per listing, so a first clean-up of years of markers does not
            // hold up new objects; the rest go at the next listings.
            let doomed = missed.intersection(&last).take(MARKERS_DELETED_PER_LISTING).cloned().collect();
            *last = missed;
            doomed
        };
        if doomed.is_empty() {
            return;
        }
        let bucket = &self.connection.bucket;
        let failed: Vec<String> = futures::stream::iter(doomed.iter().cloned())
            .map(|key| {
                let delete = self.client.delete_object().bucket(bucket).key(&key);
                async move { delete.send().await.err().map(|e| format!("s3://{bucket}/{key}: {}", describe_error(&e))) }
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        let deleted = doomed.len() - failed.len();
        metrics::counter!(names::S3_DONE_MARKERS_DELETED_TOTAL, "component" => self.id.clone())
            .increment(deleted as u64);
        if deleted > 0 {
            tracing::info!(source = %self.id, deleted, "deleted the done markers of objects no longer listed");
        }
        if let Some(first) = failed.first() {
            tracing::warn!(source = %self.id, failed = failed.len(), "deleting done markers failed (tried again at the next listing), first: {first}");
        }
    }
}

/// Whether `key` matches the source's `pattern` (`*` does not cross `/`); any key without one.
fn matches(pattern: Option<&glob::Pattern>, key: &str) -> bool {
    let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
    pattern.is_none_or(|p| p.matches_with(key, options))
}

/// Keys (with ETags, without quotes) under `prefix` that match `pattern`, in key order, without
/// the state objects.
async fn list(
    component: &str,
    client: &Client,
    connection: &Connection,
    prefix: &str,
    pattern: Option<&glob::Pattern>,
    state_prefix: &str,
) -> Result<Vec<(String, String)>> {
    let mut pages = client.list_objects_v2().bucket(&connection.bucket).prefix(prefix).into_paginator().send();
    let mut keys = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            service(component, format!("cannot list `{prefix}` in {}: {}", connection.describe(), describe_error(&e)))
        })?;
        for o in page.contents() {
            let Some(key) = o.key() else { continue };
            // Positions and exactly-once manifests, here or under a sink's prefix.
            if key.starts_with(state_prefix) || key.ends_with('/') || key.split('/').any(|seg| seg == "_sluice") {
                continue;
            }
            if !matches(pattern, key) {
                continue;
            }
            keys.push((key.to_string(), bare_etag(o.e_tag().unwrap_or_default()).to_string()));
        }
    }
    keys.sort();
    Ok(keys)
}

/// `key`'s body, or `None` when there is no such key.
async fn get_if_exists(client: &Client, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
    match client.get_object().bucket(bucket).key(key).send().await {
        Ok(o) => o.body.collect().await.map(|b| Some(b.to_vec())).map_err(|e| format!("cannot read: {e}")),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
        Err(e) => Err(format!("cannot read: {}", describe_error(&e))),
    }
}

/// `key`'s ETag (without quotes), or `None` when there is no such key.
async fn etag_if_exists(client: &Client, bucket: &str, key: &str) -> Result<Option<String>, String> {
    match client.head_object().bucket(bucket).key(key).send().await {
        Ok(h) => Ok(Some(bare_etag(h.e_tag().unwrap_or_default()).to_string())),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
        Err(e) => Err(format!("cannot read: {}", describe_error(&e))),
    }
}

async fn range(client: &Client, connection: &Connection, key: &str, range: String) -> Result<Vec<u8>, String> {
    let out = client
        .get_object()
        .bucket(&connection.bucket)
        .key(key)
        .range(range)
        .send()
        .await
        .map_err(|e| format!("cannot read s3://{}/{key}: {}", connection.bucket, describe_error(&e)))?;
    out.body
        .collect()
        .await
        .map(|b| b.to_vec())
        .map_err(|e| format!("cannot read s3://{}/{key}: {e}", connection.bucket))
}

/// The Arrow schema of a Parquet object, from its footer.
async fn parquet_schema(client: &Client, connection: &Connection, key: &str) -> Result<SchemaRef, String> {
    let name = format!("s3://{}/{key}", connection.bucket);
    let mut tail = range(client, connection, key, format!("bytes=-{FOOTER_GUESS}")).await?;
    let bad = || format!("`{name}` is not a Parquet file (no PAR1 footer)");
    if tail.len() < 8 || &tail[tail.len() - 4..] != b"PAR1" {
        return Err(bad());
    }
    let meta_len = u32::from_le_bytes(tail[tail.len() - 8..tail.len() - 4].try_into().expect("4 bytes")) as usize;
    if meta_len + 8 > tail.len() {
        tail = range(client, connection, key, format!("bytes=-{}", meta_len + 8)).await?;
        if tail.len() < meta_len + 8 {
            return Err(bad());
        }
    }
    let meta = &tail[tail.len() - 8 - meta_len..tail.len() - 8];
    let md = parquet::file::metadata::ParquetMetaDataReader::decode_metadata(meta)
        .map_err(|e| format!("`{name}` is not a readable Parquet file: {e}"))?;
    let kv = md.file_metadata().key_value_metadata();
    parquet::arrow::parquet_to_arrow_schema(md.file_metadata().schema_descr(), kv)
        .map(Arc::new)
        .map_err(|e| format!("`{name}`: {e}"))
}

/// A JSON or CSV schema inferred from the first MiB of an object.
async fn text_schema(
    client: &Client,
    connection: &Connection,
    key: &str,
    format: &FileFormat,
) -> Result<SchemaRef, String> {
    let mut head = range(client, connection, key, format!("bytes=0-{}", INFER_BYTES - 1)).await?;
    let path = PathBuf::from(format!("s3://{}/{key}", connection.bucket));
    let gz = key.ends_with(".gz");
    if !gz {
        // Only whole lines.
        if let Some(end) = memchr::memrchr(b'\n', &head) {
            head.truncate(end + 1);
        }
    }
    let input = super::file::text_input(std::io::Cursor::new(head), &path);
    if gz {
        // A cut gzip stream ends in an error: infer from the lines that decompressed.
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in input.lines() {
            match line {
                Ok(l) => {
                    lines.extend_from_slice(l.as_bytes());
                    lines.push(b'\n');
                }
                Err(_) => break,
            }
        }
        lines.truncate(memchr::memrchr(b'\n', &lines).map_or(0, |i| i + 1));
        return infer_from(std::io::Cursor::new(lines), &path, format);
    }
    infer_from(input, &path, format)
}

#[async_trait]
impl Source for S3Source {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    async fn shards(&self) -> Result<Vec<Arc<ShardInfo>>> {
        self.listing(false).await
    }

    /// The coordinator's listing, every few seconds: an object it listed once stays listed while
    /// it exists, even once marked done, so it is not taken back from a worker that is still
    /// reading other objects (the worker reports it finished at the end of its run). After a
    /// coordinator restart, objects marked done are not listed, so not granted again.
    async fn list_shards(&self) -> Result<Vec<Arc<ShardInfo>>> {
        self.listing(true).await
    }

    async fn read_shard(&self, ctx: ShardContext) -> Result<()> {
        let key = ctx.shard.id.clone();
        // Under the coordinator an object can be granted again after it was done (a worker's
        // next generation): its ETag comes first (HEAD), so a done one is not downloaded. A
        // `sluice run` reads only what its listing found not done.
        let regrant = crate::fence::active();
        // The batches carry the ETag the listing (or the grant) gave: exactly-once sinks key
        // their state by it. Content that changed since is not read under the old ETag (its rows
        // would be taken for the old version's); the next listing, or the coordinator, hands the
        // object out again under its new one.
        let changed = |etag: &str| {
            let Some(before) = ctx.shard.version().filter(|v| *v != etag) else { return false };
            tracing::warn!(
                source = %self.id, key = %key, listed = before, now = etag,
                "the object changed since it was listed; it is read under its new ETag by the next listing"
            );
            true
        };
        let (file, skip) = if regrant {
            let Some(listed) = etag_if_exists(&self.client, &self.connection.bucket, &key)
                .await
                .map_err(|e| service(&self.id, format!("s3://{}/{key}: {e}", self.connection.bucket)))?
            else {
                tracing::warn!(source = %self.id, "s3://{}/{key} was deleted after it was listed; nothing to read", self.connection.bucket);
                return Ok(());
            };
            if changed(&listed) {
                return Ok(());
            }
            let skip = match self.state.open(&self.client, &ctx.shard, &listed, true).await? {
                Resume::Done => return Ok(()),
                Resume::After(skip) => skip,
            };
            let (file, etag) = self.download(&key).await?;
            if changed(&etag) {
                return Ok(());
            }
            if etag == listed {
                (file, skip)
            } else {
                // Rewritten in between: what was downloaded is read from its start.
                self.state.restart(&key, &etag);
                (file, None)
            }
        } else {
            let (file, etag) = self.download(&key).await?;
            if changed(&etag) {
                return Ok(());
            }
            match self.state.open(&self.client, &ctx.shard, &etag, false).await? {
                Resume::Done => return Ok(()),
                Resume::After(skip) => (file, skip),
            }
        };
        let path = PathBuf::from(format!("s3://{}/{key}", self.connection.bucket));
        let mut reader =
            open_reader(&self.id, file, &path, &self.format, &self.schema, self.cast_to.clone(), ctx.batch_size)?;
        let last = Arc::new(Mutex::new(skip.unwrap_or(0)));
        let seen = last.clone();
        let read = ctx
            .run_blocking(move || loop {
                let Some(p) = reader()? else { return Ok(None) };
                if let Ok(mut l) = seen.lock() {
                    *l = (*l).max(p.last);
                }
                match skip {
                    Some(s) if p.last <= s => continue,
                    Some(s) if p.first <= s => return trim(p, s).map(Some),
                    _ => return Ok(Some(p)),
                }
            })
            .await;
        read?;
        if !ctx.cancel.is_cancelled() {
            let end = *last.lock().unwrap_or_else(|e| e.into_inner());
            self.state.read_to_end(&key, end);
            metrics::counter!(names::S3_OBJECTS_READ_TOTAL, "component" => self.id.clone()).increment(1);
        }
        Ok(())
    }

    fn committer(&self) -> Arc<dyn PositionCommitter> {
        let _ = self.state.client.set(self.client.clone());
        self.state.clone().start_writer();
        self.state.clone()
    }

    fn poll_interval(&self) -> Option<Duration> {
        self.poll_interval
    }
}

/// The records of `p` after position `skip`.
fn trim(p: Produced, skip: u64) -> Result<Produced> {
    let keep: Vec<bool> = p.positions.iter().map(|&pos| pos > skip).collect();
    let mask = arrow::array::BooleanArray::from(keep);
    let data = arrow::compute::filter_record_batch(&p.data, &mask)
        .map_err(|e| Error::Internal { component: "s3".into(), message: e.to_string() })?;
    Ok(Produced {
        data,
        positions: p.positions.into_iter().filter(|&pos| pos > skip).collect(),
        bad: p.bad.into_iter().filter(|b| b.position.is_none_or(|pos| pos > skip)).collect(),
        first: skip + 1,
        last: p.last,
        raw_bytes: p.raw_bytes,
    })
}

/// An ETag as listed or returned, without its quotes.
fn bare_etag(etag: &str) -> &str {
    etag.trim_start_matches("W/").trim_matches('"')
}

/// One object's progress, as stored in its progress object.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct ObjectProgress {
    etag: String,
    /// Last committed position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    committed: Option<u64>,
    /// Last position of the object, once it has been read to its end (0 when it holds nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end: Option<u64>,
}

impl ObjectProgress {
    fn done(&self) -> bool {
        self.end.is_some_and(|end| end == 0 || self.committed.is_some_and(|c| c >= end))
    }
}

/// Where the read of an object starts.
#[derive(Debug, PartialEq, Eq)]
enum Resume {
    /// Every record is committed: nothing to read (its done marker is written next).
    Done,
    /// After this position (`None`: from the start).
    After(Option<u64>),
}

/// What `open` makes of an object's stored progress, given the ETag of the content read now.
fn resume(stored: Option<&ObjectProgress>, etag: &str) -> Resume {
    match stored {
        Some(p) if p.etag == etag && p.done() => Resume::Done,
        Some(p) if p.etag == etag => Resume::After(p.committed),
        _ => Resume::After(None),
    }
}

/// An object being read by this process: its progress, and the shard it was granted as (the
/// fence checks that grant's epoch before each write).
struct Open {
    progress: ObjectProgress,
    shard: Arc<ShardInfo>,
    /// A progress object exists for it (read at open, or written since): deleted once done.
    stored: bool,
}

/// The source's positions, one object per data object under `prefix`; see the module docs.
struct ObjectState {
    component: String,
    connection: Connection,
    /// Ends with `/`.
    prefix: String,
    client: OnceLock<Client>,
    /// The objects this process reads, by key.
    objects: Mutex<HashMap<String, Open>>,
    /// Keys whose progress changed since it was last written.
    dirty: Mutex<BTreeSet<String>>,
    /// Keys with a progress object at the last listing (None: not listed, read each one).
    with_progress: Mutex<Option<HashSet<String>>>,
    /// One write at a time: an older snapshot never lands after a newer one.
    writing: tokio::sync::Mutex<()>,
    /// The one state object of earlier builds, moved to per-object state on the first listing.
    legacy: String,
    /// Whether this process may still commit a shard ([`crate::fence::check`]; tests fence by hand).
    check: fn(&ShardInfo) -> Result<Option<u64>, String>,
    migrated: tokio::sync::OnceCell<()>,
}

impl ObjectState {
    fn progress_key(&self, key: &str) -> String {
        format!("{}progress/{key}", self.prefix)
    }

    fn done_prefix(&self) -> String {
        format!("{}done/", self.prefix)
    }

    fn done_key(&self, key: &str, etag: &str) -> String {
        format!("{}{etag}/{key}", self.done_prefix())
    }

    fn error(&self, key: &str, detail: String) -> Error {
        service(&self.component, format!("positions in s3://{}/{key}: {detail}", self.connection.bucket))
    }

    /// The keys under `{prefix}{sub}`, without that prefix.
    async fn keys_under(&self, client: &Client, sub: &str) -> Result<Vec<String>> {
        let prefix = format!("{}{sub}", self.prefix);
        let mut pages =
            client.list_objects_v2().bucket(&self.connection.bucket).prefix(&prefix).into_paginator().send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error(&prefix, format!("cannot list: {}", describe_error(&e))))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key()?.strip_prefix(&prefix).map(str::to_string)));
        }
        Ok(keys)
    }

    /// Key → the ETags at which its every record is committed, from the done markers.
    async fn done(&self, client: &Client) -> Result<HashMap<String, HashSet<String>>> {
        let mut done: HashMap<String, HashSet<String>> = HashMap::new();
        for rest in self.keys_under(client, "done/").await? {
            if let Some((etag, key)) = rest.split_once('/') {
                done.entry(key.to_string()).or_default().insert(etag.to_string());
            }
        }
        Ok(done)
    }

    /// Moves the positions of the one state object earlier builds kept (`{source}.json`, a map of
    /// key → progress) to done markers and progress objects, then deletes it.
    async fn migrate(&self, client: &Client) -> Result<()> {
        #[derive(Deserialize)]
        struct Legacy {
            objects: std::collections::BTreeMap<String, ObjectProgress>,
        }
        let got = get_if_exists(client, &self.connection.bucket, &self.legacy).await;
        let Some(body) = got.map_err(|e| self.error(&self.legacy, e))? else { return Ok(()) };
        let legacy: Legacy = serde_json::from_slice(&body).map_err(|e| {
            self.error(
                &self.legacy,
                format!("is not a state object of an earlier sluice ({e}); delete it to start over"),
            )
        })?;
        // Objects with state of their own already (workers of this build wrote it while an
        // earlier build's wrote the old object) keep it.
        let mut kept: HashSet<String> = self.keys_under(client, "progress/").await?.into_iter().collect();
        kept.extend(self.done(client).await?.into_keys());
        let moved: Vec<(String, ObjectProgress)> = legacy
            .objects
            .into_iter()
            .filter(|(key, p)| (p.done() || p.committed.is_some()) && !kept.contains(key))
            .map(|(key, p)| (key, ObjectProgress { etag: bare_etag(&p.etag).to_string(), ..p }))
            .collect();
        let n = moved.len();
        let results: Vec<Result<()>> = futures::stream::iter(moved)
            .map(|(key, p)| async move { self.write_one(client, &key, &p, false).await })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        client
            .delete_object()
            .bucket(&self.connection.bucket)
            .key(&self.legacy)
            .send()
            .await
            .map_err(|e| self.error(&self.legacy, format!("cannot delete: {}", describe_error(&e))))?;
        tracing::info!(
            source = %self.component,
            "moved the positions of {n} objects from s3://{}/{} (an earlier build's state object) to {}",
            self.connection.bucket,
            self.legacy,
            self.prefix
        );
        Ok(())
    }

    /// Starts tracking `shard`'s object, whose content read now has `etag`: reads its stored
    /// progress and says where to resume. With `regrant` (worker mode) the progress object is
    /// always read and a done marker looked for; otherwise the last listing tells whether there
    /// is a progress object to read, and done objects were not listed.
    async fn open(&self, client: &Client, shard: &Arc<ShardInfo>, etag: &str, regrant: bool) -> Result<Resume> {
        let key = self.progress_key(&shard.id);
        let stored_somewhere = regrant
            || self
                .with_progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_none_or(|keys| keys.contains(&shard.id));
        let body = match stored_somewhere {
            true => get_if_exists(client, &self.connection.bucket, &key).await.map_err(|e| self.error(&key, e))?,
            false => None,
        };
        let stored: Option<ObjectProgress> = match body {
            Some(body) => Some(serde_json::from_slice(&body).map_err(|e| {
                self.error(&key, format!("is not a sluice progress object ({e}); delete it to read the object again"))
            })?),
            None => None,
        };
        let r = resume(stored.as_ref(), etag);
        if regrant && r != Resume::Done && self.marked_done(client, &shard.id, etag).await? {
            // Done before (its progress object deleted, or left behind by a stop between the
            // marker and the delete): nothing to read or write.
            return Ok(Resume::Done);
        }
        let exists = stored.is_some();
        let progress = match (&r, stored) {
            (Resume::After(None), _) | (_, None) => ObjectProgress { etag: etag.to_string(), ..Default::default() },
            (_, Some(p)) => p,
        };
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shard.id.clone(), Open { progress, shard: shard.clone(), stored: exists });
        if r == Resume::Done {
            self.mark_dirty(&shard.id);
        }
        Ok(r)
    }

    /// Whether the done marker of `key` at `etag` exists.
    async fn marked_done(&self, client: &Client, key: &str, etag: &str) -> Result<bool> {
        let at = self.done_key(key, etag);
        let marker = etag_if_exists(client, &self.connection.bucket, &at).await.map_err(|e| self.error(&at, e))?;
        Ok(marker.is_some())
    }

    /// The object was rewritten after `open`: its progress starts over at `etag`.
    fn restart(&self, key: &str, etag: &str) {
        if let Some(o) = self.objects.lock().unwrap_or_else(|e| e.into_inner()).get_mut(key) {
            o.progress = ObjectProgress { etag: etag.to_string(), ..Default::default() };
        }
    }

    fn mark_dirty(&self, key: &str) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if !dirty.contains(key) {
            dirty.insert(key.to_string());
        }
    }

    /// Records where the object ends. Only a done object needs a write now: a resumed read
    /// starts after the committed position and finds the end again.
    fn read_to_end(&self, key: &str, end: u64) {
        let done = self.objects.lock().unwrap_or_else(|e| e.into_inner()).get_mut(key).is_some_and(|o| {
            o.progress.end = Some(end);
            o.progress.done()
        });
        if done {
            self.mark_dirty(key);
        }
    }

    /// Writes changed positions about every second.
    fn start_writer(self: Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let weak = Arc::downgrade(&self);
        drop(self);
        handle.spawn(async move {
            loop {
                tokio::time::sleep(STATE_INTERVAL).await;
                let Some(state) = weak.upgrade() else { return };
                if let Err(e) = state.write().await {
                    tracing::warn!(error = %e, "could not save positions; retrying");
                }
            }
        });
    }

    /// Writes the progress of every object that changed (a done marker for those now complete).
    /// An object whose grant this worker no longer holds is not written (and not retried).
    async fn write(&self) -> Result<()> {
        let Some(client) = self.client.get() else { return Ok(()) };
        let _one = self.writing.lock().await;
        let keys = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let mut fenced = None;
        let mut writes = Vec::new();
        {
            let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
            for key in keys {
                let Some(o) = objects.get(&key) else { continue };
                match (self.check)(&o.shard) {
                    Ok(_) => writes.push((key, o.progress.clone(), o.stored)),
                    Err(why) => fenced = Some(why),
                }
            }
        }
        let results: Vec<(String, bool, Result<()>)> = futures::stream::iter(writes)
            .map(|(key, progress, stored)| async move {
                let r = self.write_one(client, &key, &progress, stored).await;
                (key, progress.done(), r)
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        let mut first = None;
        for (key, done, r) in results {
            match r {
                // Nothing more happens to a done object: forget it (memory stays bounded in runs
                // that poll for new objects).
                Ok(()) if done => drop(self.objects.lock().unwrap_or_else(|e| e.into_inner()).remove(&key)),
                Ok(()) => {
                    if let Some(o) = self.objects.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&key) {
                        o.stored = true;
                    }
                }
                Err(e) => {
                    self.mark_dirty(&key);
                    first.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        match fenced {
            Some(message) => Err(Error::Fenced { component: self.component.clone(), message }),
            None => Ok(()),
        }
    }

    /// Writes `key`'s progress object, or its done marker once done (then deletes the progress
    /// object when `stored` says there is one).
    async fn write_one(&self, client: &Client, key: &str, progress: &ObjectProgress, stored: bool) -> Result<()> {
        let bucket = &self.connection.bucket;
        let put = |at: String, body: Vec<u8>, content_type: &'static str| async move {
            client
                .put_object()
                .bucket(bucket)
                .key(&at)
                .content_type(content_type)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| self.error(&at, format!("cannot write: {}", describe_error(&e))))
                .map(drop)
        };
        if progress.done() {
            put(self.done_key(key, &progress.etag), Vec::new(), "application/octet-stream").await?;
            if !stored {
                return Ok(());
            }
            let at = self.progress_key(key);
            client
                .delete_object()
                .bucket(bucket)
                .key(&at)
                .send()
                .await
                .map_err(|e| self.error(&at, format!("cannot delete: {}", describe_error(&e))))?;
            return Ok(());
        }
        let body = serde_json::to_vec(progress).map_err(|e| self.error(key, e.to_string()))?;
        put(self.progress_key(key), body, "application/json").await
    }
}

#[async_trait]
impl PositionCommitter for ObjectState {
    fn commit(&self, shard: &ShardInfo, position: u64) {
        if let Err(why) = (self.check)(shard) {
            tracing::warn!(source = %self.component, "not committing position {position} of {}: fenced: {why}", shard.id);
            return;
        }
        if let Some(o) = self.objects.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&shard.id) {
            o.progress.committed = Some(o.progress.committed.map_or(position, |c| c.max(position)));
        }
        self.mark_dirty(&shard.id);
        metrics::counter!(names::COMMITS_TOTAL, "component" => shard.source.clone()).increment(1);
    }

    async fn flush(&self) -> Result<()> {
        self.write().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_is_done_when_committed_to_its_end() {
        let mut p = ObjectProgress { etag: "e".into(), committed: Some(10), end: None };
        assert!(!p.done(), "not read to its end yet");
        p.end = Some(12);
        assert!(!p.done());
        p.committed = Some(12);
        assert!(p.done());
        let empty = ObjectProgress { etag: "e".into(), committed: None, end: Some(0) };
        assert!(empty.done());
    }

    #[test]
    fn an_object_resumes_after_its_committed_position_unless_rewritten() {
        let p = |committed, end| ObjectProgress { etag: "e1".into(), committed, end };
        assert_eq!(resume(None, "e1"), Resume::After(None), "never read");
        assert_eq!(resume(Some(&p(Some(40), None)), "e1"), Resume::After(Some(40)));
        assert_eq!(
            resume(Some(&p(Some(40), Some(90))), "e1"),
            Resume::After(Some(40)),
            "read to its end, not all committed"
        );
        assert_eq!(resume(Some(&p(Some(90), Some(90))), "e1"), Resume::Done);
        assert_eq!(resume(Some(&p(Some(90), Some(90))), "e2"), Resume::After(None), "rewritten since: from the start");
        assert_eq!(bare_etag("\"abc-2\""), "abc-2");
        assert_eq!(bare_etag("W/\"abc\""), "abc", "a weak ETag from a proxy");
    }

    /// A state for object `a` (committed to 5), on a server that refuses connections.
    async fn state(check: fn(&ShardInfo) -> Result<Option<u64>, String>) -> ObjectState {
        let connection = Connection {
            bucket: "b".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("r".into()),
            force_path_style: Some(true),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            max_attempts: 1,
            request_timeout: Duration::from_secs(2),
        };
        let st = ObjectState {
            component: "src".into(),
            client: OnceLock::from(connection.client().await),
            connection,
            prefix: "_sluice/p/src/".into(),
            objects: Mutex::default(),
            dirty: Mutex::default(),
            with_progress: Mutex::default(),
            writing: tokio::sync::Mutex::new(()),
            legacy: "_sluice/p/src.json".into(),
            check,
            migrated: tokio::sync::OnceCell::new(),
        };
        let shard = Arc::new(ShardInfo {
            source: "src".into(),
            id: "a".into(),
            kind: ShardKind::File { path: "s3://b/a".into(), version: None },
            epoch: Some(3),
        });
        let progress = ObjectProgress { etag: "e".into(), committed: Some(5), end: None };
        st.objects.lock().unwrap().insert("a".into(), Open { progress, shard, stored: false });
        st
    }

    #[tokio::test]
    async fn a_fenced_object_is_neither_committed_nor_written() {
        let st = state(|s| Err(format!("shard {} moved", s.id))).await;
        let shard = st.objects.lock().unwrap()["a"].shard.clone();
        st.commit(&shard, 9);
        assert_eq!(st.objects.lock().unwrap()["a"].progress.committed, Some(5), "a fenced commit changes nothing");
        st.mark_dirty("a");
        match st.write().await {
            Err(Error::Fenced { message, .. }) => assert!(message.contains("shard a moved"), "{message}"),
            other => panic!("expected a fenced error, got {other:?}"),
        }
        assert!(st.dirty.lock().unwrap().is_empty(), "a fenced object is not retried");
    }

    #[tokio::test]
    async fn a_failed_write_is_retried_and_names_the_progress_object() {
        let st = state(|_| Ok(Some(3))).await;
        let shard = st.objects.lock().unwrap()["a"].shard.clone();
        st.commit(&shard, 9);
        assert_eq!(st.objects.lock().unwrap()["a"].progress.committed, Some(9));
        let e = st.write().await.unwrap_err().to_string();
        assert!(e.contains("s3://b/_sluice/p/src/progress/a") && e.contains("cannot write"), "{e}");
        assert!(st.dirty.lock().unwrap().contains("a"), "written again on the next round");
    }

    #[test]
    fn trimming_drops_committed_records() {
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
            "a",
            arrow::datatypes::DataType::Int64,
            false,
        )]));
        let data = arrow::record_batch::RecordBatch::try_new(
            schema,
            vec![Arc::new(arrow::array::Int64Array::from(vec![1, 2, 3, 4]))],
        )
        .unwrap();
        let p = Produced { data, positions: vec![5, 6, 7, 8], bad: vec![], first: 5, last: 8, raw_bytes: 4 };
        let t = trim(p, 6).unwrap();
        assert_eq!(t.positions, vec![7, 8]);
        assert_eq!(t.data.num_rows(), 2);
        assert_eq!(t.first, 7);
    }
}
