//! The `s3` source: Parquet, NDJSON or CSV objects (gzip too) under a prefix of an S3-compatible
//! bucket, one shard per object.
//!
//! Each object is downloaded to an anonymous temporary file (memory stays bounded whatever its
//! size) and read with the `file` source's readers; positions are 1-based line numbers (record
//! numbers for Parquet), as for files.
//!
//! Positions live in the bucket: a JSON state object (default `_sluice/{pipeline}/{source}.json`,
//! outside the listed prefix's data) records, per object key and ETag, the last committed position
//! and, once the object has been read to its end, its last position. An object whose every record
//! is committed is skipped by later runs; one that was partly committed resumes after its committed
//! position. The state is written about every second while it changes and at the end of a run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
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
/// How often changed positions are written to the state object.
const STATE_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Object holding the source's positions (default `_sluice/{pipeline}/{source id}.json`).
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
        let state_key = config.state_key.clone().unwrap_or_else(|| format!("_sluice/{pipeline}/{id}.json"));
        let client = connection.client().await;
        let prefix = config.prefix.trim_start_matches('/').to_string();
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
            let keys = list(id, &client, &connection, &prefix, pattern.as_ref(), &state_key)
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
            key: state_key,
            client: OnceLock::new(),
            objects: Mutex::default(),
            dirty: Default::default(),
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
        })
    }

    /// Downloads `key` into an anonymous temporary file.
    async fn download(&self, key: &str) -> Result<std::fs::File> {
        let out = self
            .client
            .get_object()
            .bucket(&self.connection.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.error(key, "cannot read", describe_error(&e)))?;
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
        Ok(file)
    }

    fn error(&self, key: &str, what: &str, detail: String) -> Error {
        service(&self.id, format!("{what} s3://{}/{key}: {detail}", self.connection.bucket))
    }
}

/// Keys (with ETags) under `prefix` that match `pattern`, in key order, without the state object.
async fn list(
    component: &str,
    client: &Client,
    connection: &Connection,
    prefix: &str,
    pattern: Option<&glob::Pattern>,
    state_key: &str,
) -> Result<Vec<(String, String)>> {
    let mut pages = client.list_objects_v2().bucket(&connection.bucket).prefix(prefix).into_paginator().send();
    let mut keys = Vec::new();
    let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            service(component, format!("cannot list `{prefix}` in {}: {}", connection.describe(), describe_error(&e)))
        })?;
        for o in page.contents() {
            let Some(key) = o.key() else { continue };
            // Positions and exactly-once manifests, here or under a sink's prefix.
            if key == state_key || key.ends_with('/') || key.split('/').any(|seg| seg == "_sluice") {
                continue;
            }
            if pattern.is_some_and(|p| !p.matches_with(key, options)) {
                continue;
            }
            keys.push((key.to_string(), o.e_tag().unwrap_or_default().to_string()));
        }
    }
    keys.sort();
    Ok(keys)
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
        self.state.load(&self.client).await?;
        let keys = list(&self.id, &self.client, &self.connection, &self.prefix, self.pattern.as_ref(), &self.state.key)
            .await?;
        let bucket = &self.connection.bucket;
        Ok(keys
            .into_iter()
            .filter(|(key, etag)| !self.state.is_done(key, etag))
            .map(|(key, etag)| {
                self.state.remember_etag(&key, &etag);
                Arc::new(ShardInfo {
                    source: self.id.clone(),
                    kind: ShardKind::File { path: format!("s3://{bucket}/{key}") },
                    id: key,
                    epoch: None,
                })
            })
            .collect())
    }

    async fn read_shard(&self, ctx: ShardContext) -> Result<()> {
        let key = ctx.shard.id.clone();
        let skip = self.state.committed(&key);
        let file = self.download(&key).await?;
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

/// One object's progress, as stored in the state object.
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    objects: BTreeMap<String, ObjectProgress>,
}

/// The source's positions, kept in an object of the bucket; see the module docs.
struct ObjectState {
    component: String,
    connection: Connection,
    key: String,
    client: OnceLock<Client>,
    objects: Mutex<BTreeMap<String, ObjectProgress>>,
    dirty: std::sync::atomic::AtomicBool,
}

impl ObjectState {
    async fn load(&self, client: &Client) -> Result<()> {
        let got = client.get_object().bucket(&self.connection.bucket).key(&self.key).send().await;
        let body = match got {
            Ok(o) => o.body.collect().await.map_err(|e| self.error(e.to_string()))?.to_vec(),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(()),
            Err(e) => return Err(self.error(describe_error(&e))),
        };
        let file: StateFile = serde_json::from_slice(&body)
            .map_err(|e| self.error(format!("is not a sluice state object ({e}); delete it to start over")))?;
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in file.objects {
            objects.entry(k).or_insert(v);
        }
        Ok(())
    }

    fn error(&self, detail: String) -> Error {
        service(&self.component, format!("state object s3://{}/{}: {detail}", self.connection.bucket, self.key))
    }

    fn is_done(&self, key: &str, etag: &str) -> bool {
        let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        objects.get(key).is_some_and(|p| p.etag == etag && p.done())
    }

    /// Records the ETag listed for `key`; an object rewritten since (another ETag) starts over.
    fn remember_etag(&self, key: &str, etag: &str) {
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let p = objects.entry(key.to_string()).or_default();
        if p.etag != etag {
            *p = ObjectProgress { etag: etag.to_string(), ..Default::default() };
        }
    }

    fn committed(&self, key: &str) -> Option<u64> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner()).get(key).and_then(|p| p.committed)
    }

    fn read_to_end(&self, key: &str, end: u64) {
        if let Some(p) = self.objects.lock().unwrap_or_else(|e| e.into_inner()).get_mut(key) {
            p.end = Some(end);
        }
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes the state object about every second while positions change.
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

    async fn write(&self) -> Result<()> {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let Some(client) = self.client.get() else { return Ok(()) };
        let file = StateFile { version: 1, objects: self.objects.lock().unwrap_or_else(|e| e.into_inner()).clone() };
        let body = serde_json::to_vec_pretty(&file).map_err(|e| self.error(e.to_string()))?;
        let r = client
            .put_object()
            .bucket(&self.connection.bucket)
            .key(&self.key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await;
        if let Err(e) = r {
            self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(self.error(describe_error(&e)));
        }
        Ok(())
    }
}

#[async_trait]
impl PositionCommitter for ObjectState {
    fn commit(&self, shard: &ShardInfo, position: u64) {
        if let Some(p) = self.objects.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&shard.id) {
            p.committed = Some(p.committed.map_or(position, |c| c.max(position)));
        }
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
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
