//! The `file` sink: Parquet, NDJSON or CSV files in a local directory (a mounted volume), written
//! under a hidden temporary name and renamed into place when complete.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use serde::Deserialize;

use super::writer::{
    Compression, Destination, DestinationFactory, OutputFormat, RollingWriter, RotateConfig, WriterSettings,
    DEFAULT_BUFFER_BYTES, DEFAULT_MAX_AGE, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_IDLE_BATCHES, DEFAULT_MAX_OPEN_FILES,
    DEFAULT_ROW_GROUP_BYTES,
};
use super::{blocking, Sink};
use crate::batch::Batch;
use crate::config::ByteSize;
use crate::observe::ComponentMetrics;
use crate::{Error, Result};

/// `[sinks.ID] type = "file"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Upstream component ids.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Directory the files go to (created if missing).
    pub path: String,
    /// `"parquet"` (default; `"json"` for `[dead_letter]`), `"json"` (NDJSON) or `"csv"`.
    pub format: Option<OutputFormat>,
    /// Parquet: `zstd` (default), `snappy`, `lz4`, `gzip`, `none`. JSON/CSV: `gzip` or `none`
    /// (default).
    pub compression: Option<Compression>,
    /// Columns whose values name Hive-style folders (`country=DE/`); they are not repeated inside
    /// the files.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// When to close a file and start the next.
    #[serde(default)]
    pub rotate: RotateConfig,
    /// Parquet row groups are written when their buffered data reaches this size (default 8MiB).
    pub row_group_bytes: Option<ByteSize>,
    /// Cap on data buffered in all open files together; the largest is flushed first (default
    /// 32MiB).
    pub buffer_bytes: Option<ByteSize>,
    /// Parquet dictionary encoding: `auto` (default: not for mostly-distinct columns) or `always`.
    #[serde(default)]
    pub dictionary: DictionaryMode,
    /// Cap on files open at once (one per output folder and source shard); the largest is closed
    /// first (default 64).
    pub max_open_files: Option<usize>,
    /// Files named by the source position of their first row, with a manifest of what is
    /// durable per source shard, so a replay after a crash rewrites the same files instead of
    /// adding new ones.
    #[serde(default)]
    pub exactly_once: bool,
    /// A timestamp column `rotate.max_age` is measured on (record time from the file's first
    /// record, e.g. the Kafka source's `_timestamp`) instead of the wall clock.
    pub time_column: Option<String>,
}

impl FileSinkConfig {
    /// Checks the writer settings.
    ///
    /// # Errors
    /// `(key, message)` naming the setting at fault.
    pub fn validate_writer(&self) -> Result<(), (&'static str, String)> {
        if self.rotate.max_rows == Some(0) {
            return Err(("rotate.max_rows", "must be at least 1".into()));
        }
        Ok(())
    }

    /// The writer settings with defaults applied.
    pub fn writer_settings(&self) -> WriterSettings {
        let format = self.format.unwrap_or_default();
        let compression = self.compression.unwrap_or(match format {
            OutputFormat::Parquet => Compression::Zstd,
            _ => Compression::None,
        });
        WriterSettings {
            format,
            compression,
            partition_by: self.partition_by.clone(),
            max_rows: self.rotate.max_rows,
            max_bytes: self.rotate.max_bytes.unwrap_or(DEFAULT_MAX_FILE_BYTES).0,
            max_age: self.rotate.max_age.map(|d| d.0).unwrap_or(DEFAULT_MAX_AGE),
            max_idle_batches: self.rotate.max_idle_batches.unwrap_or(DEFAULT_MAX_IDLE_BATCHES),
            row_group_bytes: self.row_group_bytes.unwrap_or(DEFAULT_ROW_GROUP_BYTES).0,
            buffer_bytes: self.buffer_bytes.unwrap_or(DEFAULT_BUFFER_BYTES).0,
            max_open_files: self.max_open_files.unwrap_or(DEFAULT_MAX_OPEN_FILES).max(1),
            adaptive_dictionary: self.dictionary == DictionaryMode::Auto,
            exactly_once: self.exactly_once,
            time_column: self.time_column.clone(),
        }
    }
}

/// `dictionary = "always" | "auto"`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DictionaryMode {
    /// Every column is dictionary-encoded (falling back to plain per page when the dictionary
    /// overflows): the Parquet writer's own default.
    Always,
    /// Columns that are mostly distinct in the first batch of at least 256 rows are written
    /// plain: the default, as hashing ids and timestamps into a dictionary that overflows costs
    /// CPU and saves nothing.
    #[default]
    Auto,
}

/// Writes files into a local directory.
pub struct FileSink {
    writer: RollingWriter,
    metrics: ComponentMetrics,
}

impl FileSink {
    /// # Errors
    /// `(key, message)` naming the setting at fault.
    pub fn new(
        component: &str,
        config: &FileSinkConfig,
        schema: &SchemaRef,
        metrics: ComponentMetrics,
    ) -> Result<Self, (&'static str, String)> {
        if config.path.trim().is_empty() {
            return Err(("path", "must name a directory".into()));
        }
        config.validate_writer()?;
        let factory = Box::new(LocalDir { root: PathBuf::from(&config.path) });
        let writer = RollingWriter::new(component, schema, config.writer_settings(), factory)?;
        Ok(FileSink { writer, metrics })
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, batch: Batch) -> Result<()> {
        let started = std::time::Instant::now();
        let r = blocking(|| self.writer.write(&batch));
        self.metrics.busy(started.elapsed());
        r
    }

    async fn tick(&mut self) -> Result<()> {
        blocking(|| self.writer.close_expired())
    }

    async fn finish(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        let r = blocking(|| self.writer.finish());
        self.metrics.busy(started.elapsed());
        r
    }

    async fn abort(&mut self) {
        blocking(|| self.writer.abort());
    }
}

/// Creates files under a root directory.
struct LocalDir {
    root: PathBuf,
}

impl DestinationFactory for LocalDir {
    fn read(&mut self, relative: &str) -> Result<Option<Vec<u8>>> {
        let path = self.root.join(relative);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("cannot read", &path, e)),
        }
    }

    fn create(&mut self, relative: &str) -> Result<Box<dyn Destination>> {
        let target = self.root.join(relative);
        let dir = target.parent().map(PathBuf::from).unwrap_or_else(|| self.root.clone());
        // Directories this file creates (a new partition folder): their entries in their parents
        // are synced on commit too, or a crash could lose a committed file's folder.
        let new_dirs: Vec<PathBuf> =
            dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).map(PathBuf::from).collect();
        fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create directory", &dir, e))?;
        let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.inprogress"));
        let file = File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
        Ok(Box::new(LocalFile { tmp, target, dir, new_dirs, file: Some(BufWriter::with_capacity(64 << 10, file)) }))
    }
}

/// One file being written under a temporary name.
struct LocalFile {
    tmp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    new_dirs: Vec<PathBuf>,
    file: Option<BufWriter<File>>,
}

impl Destination for LocalFile {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let f = self.file.as_mut().expect("open until commit or abort");
        f.write_all(bytes).map_err(|e| Error::io("cannot write", &self.tmp, e))
    }

    fn commit(mut self: Box<Self>) -> Result<()> {
        let f = self.file.take().expect("open until commit or abort");
        let placed = f
            .into_inner()
            .map_err(|e| Error::io("cannot write", &self.tmp, e.into_error()))
            .and_then(|f| f.sync_all().map_err(|e| Error::io("cannot sync", &self.tmp, e)))
            .and_then(|()| {
                fs::rename(&self.tmp, &self.target).map_err(|e| Error::io("cannot rename into place", &self.target, e))
            });
        if let Err(e) = placed {
            // The last bytes did not fit (a full disk, say): nothing half-written stays behind.
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        // Make the rename itself durable, and any folder created for the file.
        let parents = self.new_dirs.iter().filter_map(|d| d.parent()).filter(|p| !p.as_os_str().is_empty());
        for d in std::iter::once(self.dir.as_path()).chain(parents) {
            File::open(d).and_then(|f| f.sync_all()).map_err(|e| Error::io("cannot sync directory", d, e))?;
        }
        Ok(())
    }

    fn abort(mut self: Box<Self>) {
        self.file.take();
        let _ = fs::remove_file(&self.tmp);
    }
}

impl Drop for LocalFile {
    fn drop(&mut self) {
        // Neither committed nor aborted (a panic, a cancelled task): leave nothing half-written.
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
