//! The `s3` sink: Parquet, NDJSON or CSV objects on S3-compatible storage, through the rolling
//! writer the `file` sink uses.
//!
//! Each object is a multipart upload: encoded bytes collect into a part buffer and go up as a part
//! (in the background, `upload_concurrency` at a time) once `part_size` is reached; the upload is
//! completed when the writer closes the file, so nothing is visible under the final key before the
//! whole object is (an object smaller than one part is a single `PutObject`). A failed or aborted
//! object's multipart upload is aborted.
//!
//! Memory: part buffers count in the writer's `buffer_bytes` with the row groups in progress. When
//! the budget is exceeded and the largest buffer is smaller than S3's 5 MiB part minimum, it is
//! spilled to an anonymous temporary file (under `spill_dir`) and uploaded from there once the part
//! is complete — the file is never closed early, which would change where it is cut.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::file::{DictionaryMode, FileSinkConfig};
use super::writer::{Compression, Destination, DestinationFactory, OutputFormat, RollingWriter, RotateConfig};
use super::{blocking, Sink};
use crate::batch::Batch;
use crate::config::{ByteSize, HumanDuration};
use crate::observe::{names, ComponentMetrics};
use crate::s3::{describe_error, join_key, service, Connection, SecretString};
use crate::{Error, Result};

/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Default `part_size`.
pub const DEFAULT_PART_SIZE: ByteSize = ByteSize(8 << 20);
/// Default `upload_concurrency`.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;
/// S3's largest part number.
const MAX_PARTS: i32 = 10_000;

/// `[sinks.ID] type = "s3"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3SinkConfig {
    /// Upstream component ids.
    #[serde(default)]
    pub inputs: Vec<String>,
    pub bucket: String,
    /// Key prefix (a folder) the objects go under.
    #[serde(default)]
    pub prefix: String,
    /// `http(s)://host:port` of MinIO, Ceph RGW, Garage...; AWS S3 when absent.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`); default true when `endpoint` is set.
    pub force_path_style: Option<bool>,
    /// Static credentials, normally `${VAR}`s; the standard AWS chain when absent.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    /// Tries per request, the first included (default 8).
    pub max_attempts: Option<u32>,
    /// Limit on one try of one request (default 60s).
    pub request_timeout: Option<HumanDuration>,
    /// `"parquet"` (default), `"json"` (NDJSON) or `"csv"`.
    pub format: Option<OutputFormat>,
    /// As for the `file` sink.
    pub compression: Option<Compression>,
    #[serde(default)]
    pub partition_by: Vec<String>,
    #[serde(default)]
    pub rotate: RotateConfig,
    pub row_group_bytes: Option<ByteSize>,
    /// Cap on row groups in progress and part buffers of all open objects together (default 32MiB).
    pub buffer_bytes: Option<ByteSize>,
    #[serde(default)]
    pub dictionary: DictionaryMode,
    pub max_open_files: Option<usize>,
    /// Object keys from the source position of their first row and a manifest of what is durable,
    /// so a replay rewrites the same objects (see the README).
    #[serde(default)]
    pub exactly_once: bool,
    pub time_column: Option<String>,
    /// Multipart part size (default 8MiB, at least 5MiB).
    pub part_size: Option<ByteSize>,
    /// Parts uploading at once, across all objects (default 4).
    pub upload_concurrency: Option<usize>,
    /// Where part buffers spill when `buffer_bytes` is exceeded (default: the system's temporary
    /// directory).
    pub spill_dir: Option<PathBuf>,
}

impl S3SinkConfig {
    /// The connection settings.
    pub fn connection(&self) -> Connection {
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

    /// The writer options, as the `file` sink takes them.
    fn as_file_sink(&self) -> FileSinkConfig {
        FileSinkConfig {
            inputs: self.inputs.clone(),
            path: String::new(),
            format: self.format,
            compression: self.compression,
            partition_by: self.partition_by.clone(),
            rotate: self.rotate.clone(),
            row_group_bytes: self.row_group_bytes,
            buffer_bytes: self.buffer_bytes,
            dictionary: self.dictionary,
            max_open_files: self.max_open_files,
            exactly_once: self.exactly_once,
            time_column: self.time_column.clone(),
        }
    }
}

/// What every object of one sink shares.
struct Shared {
    component: String,
    connection: Connection,
    prefix: String,
    part_size: u64,
    spill_dir: PathBuf,
    client: OnceLock<(Client, tokio::runtime::Handle)>,
    uploads: Arc<Semaphore>,
    parts_uploaded: metrics::Counter,
    bytes_uploaded: metrics::Counter,
    spilled: metrics::Counter,
    aborted: metrics::Counter,
}

impl Shared {
    fn client(&self) -> (Client, tokio::runtime::Handle) {
        self.client.get().cloned().expect("connected before the first write")
    }

    fn error(&self, key: &str, what: &str, detail: String) -> Error {
        service(&self.component, format!("{what} s3://{}/{key}: {detail}", self.connection.bucket))
    }
}

/// Writes objects to a bucket.
pub struct S3Sink {
    shared: Arc<Shared>,
    writer: RollingWriter,
    metrics: ComponentMetrics,
}

impl S3Sink {
    /// # Errors
    /// `(key, message)` naming the setting at fault.
    pub fn new(
        component: &str,
        config: &S3SinkConfig,
        schema: &SchemaRef,
        metrics: ComponentMetrics,
    ) -> Result<Self, (&'static str, String)> {
        let connection = config.connection();
        connection.validate()?;
        let file = config.as_file_sink();
        file.validate_writer()?;
        let part_size = config.part_size.unwrap_or(DEFAULT_PART_SIZE).0;
        if part_size < MIN_PART_SIZE {
            return Err(("part_size", format!("S3 parts are at least 5MiB; {part_size} bytes is too small")));
        }
        let concurrency = config.upload_concurrency.unwrap_or(DEFAULT_UPLOAD_CONCURRENCY);
        if concurrency == 0 {
            return Err(("upload_concurrency", "must be at least 1".into()));
        }
        let label = || component.to_string();
        let shared = Arc::new(Shared {
            component: component.to_string(),
            connection,
            prefix: config.prefix.trim_matches('/').to_string(),
            part_size,
            spill_dir: config.spill_dir.clone().unwrap_or_else(std::env::temp_dir),
            client: OnceLock::new(),
            uploads: Arc::new(Semaphore::new(concurrency)),
            parts_uploaded: metrics::counter!(names::S3_PARTS_UPLOADED_TOTAL, "component" => label()),
            bytes_uploaded: metrics::counter!(names::S3_BYTES_UPLOADED_TOTAL, "component" => label()),
            spilled: metrics::counter!(names::S3_SPILLED_BYTES_TOTAL, "component" => label()),
            aborted: metrics::counter!(names::S3_UPLOADS_ABORTED_TOTAL, "component" => label()),
        });
        let factory = Box::new(S3Factory { shared: shared.clone() });
        let writer = RollingWriter::new(component, schema, file.writer_settings(), factory)?;
        Ok(S3Sink { shared, writer, metrics })
    }
}

/// Builds the client and checks the bucket, once (before the first write).
async fn connect(shared: Arc<Shared>) -> Result<()> {
    if shared.client.get().is_none() {
        let client = shared.connection.connect(&shared.component).await?;
        let _ = shared.client.set((client, tokio::runtime::Handle::current()));
    }
    Ok(())
}

#[async_trait]
impl Sink for S3Sink {
    async fn write(&mut self, batch: Batch) -> Result<()> {
        connect(self.shared.clone()).await?;
        let started = std::time::Instant::now();
        let r = blocking(|| self.writer.write(&batch));
        self.metrics.busy(started.elapsed());
        r
    }

    async fn tick(&mut self) -> Result<()> {
        if self.shared.client.get().is_none() {
            return Ok(());
        }
        blocking(|| self.writer.close_expired())
    }

    async fn finish(&mut self) -> Result<()> {
        if self.writer.open_files() == 0 {
            return Ok(());
        }
        connect(self.shared.clone()).await?;
        let started = std::time::Instant::now();
        let r = blocking(|| self.writer.finish());
        self.metrics.busy(started.elapsed());
        r
    }

    async fn abort(&mut self) {
        blocking(|| self.writer.abort());
    }
}

struct S3Factory {
    shared: Arc<Shared>,
}

impl DestinationFactory for S3Factory {
    fn read(&mut self, relative: &str) -> Result<Option<Vec<u8>>> {
        let key = join_key(&self.shared.prefix, relative);
        let (client, handle) = self.shared.client();
        let got = handle.block_on(client.get_object().bucket(&self.shared.connection.bucket).key(&key).send());
        match got {
            Ok(o) => handle
                .block_on(o.body.collect())
                .map(|b| Some(b.to_vec()))
                .map_err(|e| self.shared.error(&key, "cannot read", e.to_string())),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(self.shared.error(&key, "cannot read", describe_error(&e))),
        }
    }

    fn create(&mut self, relative: &str) -> Result<Box<dyn Destination>> {
        Ok(Box::new(S3Object {
            shared: self.shared.clone(),
            key: join_key(&self.shared.prefix, relative),
            buf: Vec::new(),
            spill: None,
            spill_len: 0,
            upload_id: None,
            parts: Vec::new(),
            total: 0,
            finished: false,
        }))
    }
}

/// One object being uploaded.
struct S3Object {
    shared: Arc<Shared>,
    key: String,
    /// The part in progress (after what was spilled of it).
    buf: Vec<u8>,
    /// The start of the part in progress, when memory ran short.
    spill: Option<File>,
    spill_len: u64,
    upload_id: Option<String>,
    parts: Vec<JoinHandle<Result<CompletedPart>>>,
    /// Bytes handed to part uploads.
    total: u64,
    finished: bool,
}

impl S3Object {
    fn part_len(&self) -> u64 {
        self.spill_len + self.buf.len() as u64
    }

    /// The part in progress as one buffer (read back from the spill file when there is one).
    fn take_part(&mut self) -> Result<Vec<u8>> {
        let mut data = Vec::with_capacity(self.part_len() as usize);
        if let Some(f) = self.spill.as_mut() {
            let io = |e| Error::io("cannot read spilled part of", self.shared.spill_dir.clone(), e);
            f.seek(SeekFrom::Start(0)).map_err(io)?;
            f.take(self.spill_len).read_to_end(&mut data).map_err(io)?;
            self.spill_len = 0;
        }
        // Back to memory for the next part (the anonymous file is deleted when dropped).
        self.spill = None;
        data.append(&mut self.buf);
        self.buf = Vec::new();
        Ok(data)
    }

    /// Starts the multipart upload if needed and uploads the part in progress in the background.
    fn upload_part(&mut self) -> Result<()> {
        let (client, handle) = self.shared.client();
        let bucket = self.shared.connection.bucket.clone();
        if self.upload_id.is_none() {
            let created = handle
                .block_on(client.create_multipart_upload().bucket(&bucket).key(&self.key).send())
                .map_err(|e| self.shared.error(&self.key, "cannot start the upload of", describe_error(&e)))?;
            let id = created.upload_id().unwrap_or_default().to_string();
            if id.is_empty() {
                return Err(self.shared.error(&self.key, "no upload id for", "the server sent none".into()));
            }
            self.upload_id = Some(id);
        }
        let number = self.parts.len() as i32 + 1;
        if number > MAX_PARTS {
            return Err(self.shared.error(
                &self.key,
                "too many parts for",
                format!("S3 allows {MAX_PARTS}; raise part_size or lower rotate limits"),
            ));
        }
        let data = self.take_part()?;
        self.total += data.len() as u64;
        // Waits here when `upload_concurrency` parts are already in flight (backpressure).
        let permit = handle
            .block_on(self.shared.uploads.clone().acquire_owned())
            .map_err(|_| self.shared.error(&self.key, "cannot upload", "the sink is shutting down".into()))?;
        let shared = self.shared.clone();
        let key = self.key.clone();
        let upload_id = self.upload_id.clone().unwrap_or_default();
        self.parts.push(handle.spawn(async move {
            let _permit = permit;
            let len = data.len() as u64;
            let out = client
                .upload_part()
                .bucket(&bucket)
                .key(&key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| shared.error(&key, &format!("cannot upload part {number} of"), describe_error(&e)))?;
            shared.parts_uploaded.increment(1);
            shared.bytes_uploaded.increment(len);
            Ok(CompletedPart::builder().set_e_tag(out.e_tag().map(String::from)).part_number(number).build())
        }));
        Ok(())
    }

    fn complete(&mut self) -> Result<()> {
        let (client, handle) = self.shared.client();
        let bucket = self.shared.connection.bucket.clone();
        if self.upload_id.is_none() {
            let data = self.take_part()?;
            let len = data.len() as u64;
            handle
                .block_on(client.put_object().bucket(&bucket).key(&self.key).body(ByteStream::from(data)).send())
                .map_err(|e| self.shared.error(&self.key, "cannot write", describe_error(&e)))?;
            self.shared.bytes_uploaded.increment(len);
            return Ok(());
        }
        if self.part_len() > 0 {
            self.upload_part()?;
        }
        let mut parts = Vec::with_capacity(self.parts.len());
        let mut first_error = None;
        for task in std::mem::take(&mut self.parts) {
            match handle.block_on(task) {
                Ok(Ok(p)) => parts.push(p),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(self.shared.error(&self.key, "part upload of", e.to_string()));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let upload_id = self.upload_id.clone().unwrap_or_default();
        let completed = handle.block_on(
            client
                .complete_multipart_upload()
                .bucket(&bucket)
                .key(&self.key)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send(),
        );
        if let Err(e) = completed {
            // A retry of a completion whose answer was lost finds the upload gone: the object is
            // there if it has every byte.
            let gone = e.as_service_error().and_then(|s| s.code()) == Some("NoSuchUpload");
            let there = gone
                && handle
                    .block_on(client.head_object().bucket(&bucket).key(&self.key).send())
                    .is_ok_and(|h| h.content_length() == Some(self.total as i64));
            if !there {
                return Err(self.shared.error(&self.key, "cannot complete the upload of", describe_error(&e)));
            }
        }
        self.upload_id = None;
        Ok(())
    }

    /// Stops part uploads and aborts the multipart upload (in the background when `wait` is false).
    fn abort_upload(&mut self, wait: bool) {
        for task in self.parts.drain(..) {
            task.abort();
        }
        let Some(upload_id) = self.upload_id.take() else { return };
        let Some((client, handle)) = self.shared.client.get().cloned() else { return };
        let shared = self.shared.clone();
        let key = self.key.clone();
        let fut = async move {
            let r = client
                .abort_multipart_upload()
                .bucket(&shared.connection.bucket)
                .key(&key)
                .upload_id(upload_id)
                .send()
                .await;
            match r {
                Ok(_) => shared.aborted.increment(1),
                Err(e) => tracing::warn!(
                    component = %shared.component, key = %key, error = %describe_error(&e),
                    "could not abort a multipart upload; a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes it"
                ),
            }
        };
        if wait {
            handle.block_on(fut);
        } else {
            handle.spawn(fut);
        }
    }
}

impl Destination for S3Object {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if let Some(f) = self.spill.as_mut().filter(|_| self.buf.is_empty()) {
            // The part started spilling: keep it on disk until it is uploaded.
            f.write_all(bytes).map_err(|e| Error::io("cannot spill a part to", self.shared.spill_dir.clone(), e))?;
            self.spill_len += bytes.len() as u64;
            self.shared.spilled.increment(bytes.len() as u64);
        } else {
            self.buf.extend_from_slice(bytes);
        }
        if self.part_len() >= self.shared.part_size {
            self.upload_part()?;
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<()> {
        let r = self.complete();
        if r.is_err() {
            self.abort_upload(true);
        }
        self.finished = true;
        r
    }

    fn abort(mut self: Box<Self>) {
        self.abort_upload(true);
        self.finished = true;
    }

    fn buffered(&self) -> u64 {
        self.buf.len() as u64
    }

    fn relieve(&mut self) -> Result<()> {
        if self.part_len() >= MIN_PART_SIZE {
            return self.upload_part();
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let dir = self.shared.spill_dir.clone();
        if self.spill.is_none() {
            self.spill =
                Some(tempfile::tempfile_in(&dir).map_err(|e| Error::io("cannot create a spill file in", &dir, e))?);
        }
        let f = self.spill.as_mut().expect("created above");
        f.write_all(&self.buf).map_err(|e| Error::io("cannot spill a part to", &dir, e))?;
        self.spill_len += self.buf.len() as u64;
        self.shared.spilled.increment(self.buf.len() as u64);
        self.buf = Vec::new();
        Ok(())
    }
}

impl Drop for S3Object {
    fn drop(&mut self) {
        if !self.finished {
            // Neither committed nor aborted (a panic, a cancelled task): abort in the background.
            self.abort_upload(false);
        }
    }
}
