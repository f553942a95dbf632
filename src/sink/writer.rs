//! The rolling, partitioned file writer shared by the file sink and object-storage sinks: encodes
//! batches as Parquet, NDJSON or CSV into one open file per (output folder, source shard), rotates
//! files by rows, bytes and age, bounds buffered memory, and releases acks when a file is committed.
//!
//! File names are deterministic: `part-{shard}-{first position:020}.{ext}` under Hive-style
//! `col=value/` folders, so replaying the same input rewrites the same files.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, UInt32Array};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use indexmap::IndexMap;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::Deserialize;

use crate::batch::{Ack, Batch, ShardInfo};
use crate::config::{ByteSize, HumanDuration};
use crate::observe::names;
use crate::{Error, Result};

/// Default `rotate.max_bytes`: 128 MiB.
pub const DEFAULT_MAX_FILE_BYTES: ByteSize = ByteSize(128 << 20);
/// Default `rotate.max_age`: 60 s.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);
/// Default Parquet row-group size in bytes of buffered data: 8 MiB.
pub const DEFAULT_ROW_GROUP_BYTES: ByteSize = ByteSize(8 << 20);
/// Default cap on bytes buffered in all open files together: 32 MiB.
pub const DEFAULT_BUFFER_BYTES: ByteSize = ByteSize(32 << 20);
/// Most rows in one Parquet row group (DuckDB writes 122,880). The byte limit alone is not enough:
/// the writer counts encoded, compressed pages, so plain-encoded columns (`dictionary = "auto"`)
/// would let a row group reach ~600k rows.
const MAX_ROW_GROUP_ROWS: usize = 128 * 1024;
/// Default `rotate.max_idle_batches`: a file its shard's last 16 batches did not touch is closed.
/// Output folders by record time (a day, an hour) are written one after another: without this,
/// each stays open, buffering a row group, until `max_age` or `max_open_files` closes it.
pub const DEFAULT_MAX_IDLE_BATCHES: u64 = 16;
/// Default cap on files open at once.
pub const DEFAULT_MAX_OPEN_FILES: usize = 64;
/// Folder (under the sink's root) of the exactly-once manifests, one per source shard. Readers of
/// Hive-style datasets skip `_`-prefixed folders.
pub const MANIFEST_DIR: &str = "_sluice/manifests";
/// `exactly_once`: manifests kept in memory whether or not their shard has an open file.
const MANIFESTS_KEPT: usize = 1024;
/// The manifest format written (2 added `durable_below` and `source`).
const MANIFEST_VERSION: u32 = 2;
/// How many recent file names are remembered to avoid reusing one.
const RECENT_NAMES: usize = 4096;
/// Folder name for a null partition value (as Hive and Spark write it).
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// Output encoding.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    #[default]
    Parquet,
    /// Newline-delimited JSON.
    Json,
    Csv,
}

impl OutputFormat {
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Parquet => "parquet",
            OutputFormat::Json => "ndjson",
            OutputFormat::Csv => "csv",
        }
    }
}

/// Compression codec: Parquet takes `zstd` (default), `snappy`, `lz4`, `gzip`, `none`; JSON and
/// CSV take `gzip` or `none` (default).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Zstd,
    Snappy,
    Lz4,
    Gzip,
}

/// `rotate = { max_rows, max_bytes, max_age }`: a file is closed when any limit is reached.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RotateConfig {
    /// Records per file.
    pub max_rows: Option<u64>,
    /// Encoded bytes per file (default 128MiB).
    pub max_bytes: Option<ByteSize>,
    /// Time a file stays open (default 60s); bounds how long records wait to be committed.
    pub max_age: Option<HumanDuration>,
    /// Close a file once this many batches of its source shard in a row brought it no rows
    /// (default 16; 0 keeps idle files open).
    pub max_idle_batches: Option<u64>,
}

/// Everything the writer needs to know, resolved from a sink's config.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub format: OutputFormat,
    pub compression: Compression,
    pub partition_by: Vec<String>,
    pub max_rows: Option<u64>,
    pub max_bytes: u64,
    pub max_age: Duration,
    /// See [`RotateConfig::max_idle_batches`]; 0 is off.
    pub max_idle_batches: u64,
    pub row_group_bytes: u64,
    pub buffer_bytes: u64,
    pub max_open_files: usize,
    /// Parquet: dictionary-encode only columns that are not mostly distinct.
    pub adaptive_dictionary: bool,
    /// Exactly-once files: each is named by the source position of its first row, and a
    /// manifest per source shard records the last position committed in each output folder, so
    /// that a replay skips what is already durable and rewrites the rest under the same names.
    pub exactly_once: bool,
    /// Timestamp column `max_age` is measured on (record time, from the file's first record)
    /// instead of the wall clock.
    pub time_column: Option<String>,
}

/// The column holding each row's source position when a transform between the source and the
/// sink has dropped the row-to-record mapping (the Kafka source's `_offset`).
pub const POSITION_COLUMN: &str = "_offset";

/// Where one output file's bytes go: a temporary local file, a multipart upload.
pub trait Destination: Send {
    /// Appends encoded bytes.
    ///
    /// # Errors
    /// I/O or upload failures, naming the destination.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    /// Makes the file durable and visible under its final name, complete or not at all.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    fn commit(self: Box<Self>) -> Result<()>;
    /// Removes whatever was written.
    fn abort(self: Box<Self>);
    /// Bytes this destination holds in memory (an object-store part not yet uploaded); counted in
    /// the writer's `buffer_bytes`.
    fn buffered(&self) -> u64 {
        0
    }
    /// Gives back the memory counted by [`buffered`](Self::buffered) (uploads a part, or moves
    /// it to a spill file when it is too small to be a part).
    ///
    /// # Errors
    /// As [`write`](Self::write).
    fn relieve(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What one source shard has made durable in this sink's output.
#[derive(Debug, Default, serde::Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// The source the shard belongs to: two sources with a shard of the same name (two
    /// generators, same-named topics of two clusters) must not share a manifest.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    source: String,
    /// Every row of the shard before this position is durable (in a completed file, or never
    /// meant for this sink). Version 2; a version-1 manifest reads as 0.
    #[serde(default)]
    durable_below: u64,
    /// The last position committed in each output folder, kept only for folders committed at or
    /// past `durable_below`, so the manifest is bounded by the files open, not by the history.
    folders: std::collections::BTreeMap<String, u64>,
    /// The version of the shard's content these positions belong to (an S3 object's ETag):
    /// a rewritten object is read again from its first position, and none of its rows are
    /// durable yet. Absent for unversioned shards, and in manifests of earlier builds (taken to
    /// be of the version that arrives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shard_version: Option<String>,
    /// The writer's batch count when the shard last wrote (in memory only): the least recently
    /// used manifests are dropped first.
    #[serde(skip)]
    used: u64,
}

impl Manifest {
    /// The last position of `folder` a replay must skip, if any.
    fn done(&self, folder: &str) -> Option<u64> {
        self.folders.get(folder).copied().max(self.durable_below.checked_sub(1))
    }
}

/// Creates destinations for relative file names such as `dt=2026-01-01/part-gen-0-….parquet`.
pub trait DestinationFactory: Send {
    /// # Errors
    /// When the destination cannot be created.
    fn create(&mut self, relative: &str) -> Result<Box<dyn Destination>>;
    /// Reads a small file written through [`create`](Self::create), `None` when it does not exist.
    ///
    /// # Errors
    /// When it exists but cannot be read.
    fn read(&mut self, relative: &str) -> Result<Option<Vec<u8>>>;
}

/// Growable buffer the encoders write into; drained into the destination after each write.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Plain or gzip output for the text formats.
enum TextOut {
    Plain(SharedBuf),
    Gzip(Box<flate2::write::GzEncoder<SharedBuf>>),
}

impl Write for TextOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            TextOut::Plain(b) => b.write(buf),
            TextOut::Gzip(g) => g.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TextOut {
    fn finish(self) -> std::io::Result<()> {
        match self {
            TextOut::Plain(_) => Ok(()),
            TextOut::Gzip(g) => g.finish().map(|_| ()),
        }
    }
}

/// Dictionary page size at which a column chunk falls back to plain encoding. parquet-rs's default
/// (1 MiB) holds 128Ki distinct 8-byte values, a whole row group: a near-unique column was hashed
/// value by value and then written as a dictionary as large as the data. At 256 KiB it falls back
/// after 32Ki values; columns with fewer distinct values than that keep their dictionary. The cost:
/// the plain remainder of such a column is larger in an open row group than dictionary indices
/// (the quickstart's 12 open day files peak at ~157 MiB instead of ~104 MiB at 1M records).
const DICTIONARY_PAGE_BYTES: usize = 256 << 10;

/// Top-level columns whose first values are mostly distinct (order ids, timestamps, amounts).
/// The Parquet writer dictionary-encodes every column by default: for such a column it hashes each
/// value until the dictionary page overflows and then falls back to plain encoding, in every row
/// group, which costs about a fifth of a pipeline's CPU and saves nothing. Low-cardinality columns
/// (status, country, day) keep their dictionary. `None` for a batch too small to tell (a Kafka
/// partition's chunk of a few records): the file it opens keeps every dictionary, and the next
/// file opened decides.
fn high_cardinality_columns(batch: &RecordBatch) -> Option<Vec<String>> {
    const SAMPLE: usize = 4096;
    let n = batch.num_rows().min(SAMPLE);
    if n < 256 {
        return None;
    }
    let schema = batch.schema();
    let plain = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(_, col)| distinct_values(&col.slice(0, n)).is_some_and(|d| d * 2 > n))
        .map(|(f, _)| f.name().clone())
        .collect();
    Some(plain)
}

/// Distinct values of a flat column (nulls count as the value under them), or `None` for types
/// this does not measure.
fn distinct_values(col: &ArrayRef) -> Option<usize> {
    use arrow::array::AsArray;
    use arrow::datatypes::DataType;
    use std::collections::HashSet;
    let dt = col.data_type();
    if let Some(width) = dt.primitive_width() {
        let data = col.to_data();
        let values = data.buffers().first()?.as_slice();
        let bytes = values.get(data.offset() * width..(data.offset() + data.len()) * width)?;
        return Some(bytes.chunks_exact(width).collect::<HashSet<_>>().len());
    }
    Some(match dt {
        DataType::Utf8 => col.as_string::<i32>().iter().collect::<HashSet<_>>().len(),
        DataType::LargeUtf8 => col.as_string::<i64>().iter().collect::<HashSet<_>>().len(),
        DataType::Utf8View => col.as_string_view().iter().collect::<HashSet<_>>().len(),
        _ => return None,
    })
}

enum Encoder {
    Parquet(Box<ArrowWriter<SharedBuf>>),
    Json(Box<arrow::json::LineDelimitedWriter<TextOut>>),
    Csv(Box<arrow::csv::Writer<TextOut>>),
}

impl Encoder {
    fn new(settings: &WriterSettings, schema: &SchemaRef, plain: &[String], buf: SharedBuf) -> Result<Self, String> {
        let text_out = |buf: SharedBuf| match settings.compression {
            Compression::Gzip => {
                TextOut::Gzip(Box::new(flate2::write::GzEncoder::new(buf, flate2::Compression::default())))
            }
            _ => TextOut::Plain(buf),
        };
        Ok(match settings.format {
            OutputFormat::Parquet => {
                let compression = match settings.compression {
                    Compression::None => PqCompression::UNCOMPRESSED,
                    Compression::Zstd => PqCompression::ZSTD(ZstdLevel::default()),
                    Compression::Snappy => PqCompression::SNAPPY,
                    Compression::Lz4 => PqCompression::LZ4_RAW,
                    Compression::Gzip => PqCompression::GZIP(Default::default()),
                };
                let mut props = WriterProperties::builder()
                    .set_compression(compression)
                    .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
                    .set_dictionary_page_size_limit(DICTIONARY_PAGE_BYTES);
                for col in plain {
                    props = props.set_column_dictionary_enabled(ColumnPath::from(col.as_str()), false);
                }
                let props = props.build();
                let w = ArrowWriter::try_new(buf, schema.clone(), Some(props)).map_err(|e| e.to_string())?;
                Encoder::Parquet(Box::new(w))
            }
            OutputFormat::Json => Encoder::Json(Box::new(arrow::json::LineDelimitedWriter::new(text_out(buf)))),
            OutputFormat::Csv => {
                Encoder::Csv(Box::new(arrow::csv::WriterBuilder::new().with_header(true).build(text_out(buf))))
            }
        })
    }

    fn write(&mut self, batch: &RecordBatch, row_group_bytes: u64) -> Result<(), String> {
        match self {
            Encoder::Parquet(w) => {
                w.write(batch).map_err(|e| e.to_string())?;
                if w.memory_size() as u64 >= row_group_bytes {
                    w.flush().map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Encoder::Json(w) => w.write(batch).map_err(|e| e.to_string()),
            Encoder::Csv(w) => w.write(batch).map_err(|e| e.to_string()),
        }
    }

    /// Bytes held in memory for the row group in progress (encoded pages and unencoded values).
    fn buffered(&self) -> u64 {
        match self {
            Encoder::Parquet(w) => w.memory_size() as u64,
            _ => 0,
        }
    }

    /// Expected encoded size of what is buffered, once written.
    fn pending_output(&self) -> u64 {
        match self {
            Encoder::Parquet(w) => w.in_progress_size() as u64,
            _ => 0,
        }
    }

    fn flush_row_group(&mut self) -> Result<(), String> {
        match self {
            Encoder::Parquet(w) => w.flush().map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self {
            Encoder::Parquet(w) => w.close().map(|_| ()).map_err(|e| e.to_string()),
            Encoder::Json(mut w) => {
                w.finish().map_err(|e| e.to_string())?;
                w.into_inner().finish().map_err(|e| e.to_string())
            }
            Encoder::Csv(w) => w.into_inner().finish().map_err(|e| e.to_string()),
        }
    }
}

struct OpenFile {
    name: String,
    encoder: Encoder,
    buf: SharedBuf,
    dest: Box<dyn Destination>,
    rows: u64,
    written: u64,
    opened: Instant,
    /// Record time (µs since the epoch) of the file's first timed row (`exactly_once` with a
    /// `time_column`).
    first_time: Option<i64>,
    /// Source positions of the first and the last row written (`exactly_once`).
    first_position: Option<u64>,
    last_position: Option<u64>,
    /// Its shard's batch count (see `RollingWriter::shard_batches`) when it last got rows.
    last_batch: u64,
    acks: Vec<Ack>,
}

impl OpenFile {
    fn size(&self) -> u64 {
        self.written + self.encoder.pending_output()
    }

    fn drain(&mut self) -> Result<()> {
        let bytes = self.buf.take();
        if !bytes.is_empty() {
            self.written += bytes.len() as u64;
            self.dest.write(&bytes)?;
        }
        Ok(())
    }
}

/// Writes batches into rolling, partitioned files; see the module docs.
pub struct RollingWriter {
    component: String,
    settings: WriterSettings,
    factory: Box<dyn DestinationFactory>,
    partition_columns: Vec<usize>,
    data_columns: Vec<usize>,
    file_schema: SchemaRef,
    open: HashMap<(String, String), OpenFile>,
    /// The most recent names opened (at most [`RECENT_NAMES`]), so two files never get the same
    /// name (see `open_file`); bounded, since positions move on.
    names_used: std::collections::VecDeque<String>,
    /// Parquet columns written without a dictionary, chosen from the first batch (see
    /// [`high_cardinality_columns`]).
    plain_columns: Option<Vec<String>>,
    /// Index of `time_column` in the input.
    time_column: Option<usize>,
    /// `exactly_once`: the manifests of the source shards with open files, read when a batch of
    /// the shard arrives and none is open.
    manifests: HashMap<String, Manifest>,
    /// `exactly_once`: the shard of the batch being written and its lowest source position.
    in_progress: Option<(String, u64)>,
    /// Batches written per source shard, the clock of `max_idle_batches`.
    shard_batches: HashMap<String, u64>,
    /// `exactly_once`: batches written, the clock of [`Manifest::used`].
    batches_written: u64,
    files_written: metrics::Counter,
}

/// The rows of one batch that go to one output folder.
struct Group {
    folder: String,
    data: RecordBatch,
    /// Row indexes in the input batch (the `take` indexes that built `data`); `None` when the
    /// group is the whole batch.
    rows: Option<UInt32Array>,
}

impl Group {
    fn input_row(&self, i: usize) -> usize {
        self.rows.as_ref().map_or(i, |r| r.value(i) as usize)
    }
}

impl RollingWriter {
    /// # Errors
    /// `(key, message)` when a `partition_by` column is not in `schema`, or the compression does
    /// not suit the format.
    pub fn new(
        component: &str,
        schema: &SchemaRef,
        settings: WriterSettings,
        factory: Box<dyn DestinationFactory>,
    ) -> Result<Self, (&'static str, String)> {
        let mut partition_columns = Vec::new();
        for col in &settings.partition_by {
            let idx = schema.index_of(col).map_err(|_| {
                let known: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                ("partition_by", format!("column `{col}` is not in the sink's input; it has: {}", known.join(", ")))
            })?;
            partition_columns.push(idx);
        }
        if settings.format != OutputFormat::Parquet
            && !matches!(settings.compression, Compression::None | Compression::Gzip)
        {
            return Err((
                "compression",
                format!("{:?} output takes compression \"gzip\" or \"none\"", settings.format),
            ));
        }
        let data_columns: Vec<usize> = (0..schema.fields().len()).filter(|i| !partition_columns.contains(i)).collect();
        if data_columns.is_empty() {
            return Err(("partition_by", "every column is a partition column; files would have no columns".into()));
        }
        let file_schema = Arc::new(schema.project(&data_columns).map_err(|e| ("partition_by", e.to_string()))?);
        let time_column = match &settings.time_column {
            Some(col) => {
                let idx = schema
                    .index_of(col)
                    .map_err(|_| ("time_column", format!("column `{col}` is not in the sink's input")))?;
                if !matches!(schema.field(idx).data_type(), arrow::datatypes::DataType::Timestamp(_, _)) {
                    return Err((
                        "time_column",
                        format!("column `{col}` is {}, not a timestamp", schema.field(idx).data_type()),
                    ));
                }
                Some(idx)
            }
            None => None,
        };
        let files_written = metrics::counter!(names::SINK_FILES_WRITTEN_TOTAL, "component" => component.to_string());
        Ok(RollingWriter {
            component: component.to_string(),
            settings,
            factory,
            partition_columns,
            data_columns,
            file_schema,
            open: HashMap::new(),
            names_used: Default::default(),
            plain_columns: None,
            time_column,
            manifests: HashMap::new(),
            in_progress: None,
            shard_batches: HashMap::new(),
            batches_written: 0,
            files_written,
        })
    }

    /// The schema of the files written (the input less the partition columns).
    pub fn file_schema(&self) -> &Schema {
        &self.file_schema
    }

    /// Encodes `batch` into the open file of each of its partitions, rotating as needed.
    ///
    /// # Errors
    /// Encoding and destination failures; with `exactly_once`, a batch whose rows' source
    /// positions are unknown.
    pub fn write(&mut self, batch: &Batch) -> Result<()> {
        let mut positions = if self.settings.exactly_once { Some(self.row_positions(batch)?) } else { None };
        // Exactly-once reasons in source order (see `write_manifest`): rows a transform
        // reordered (`ORDER BY` with `_offset` kept) are put back in it.
        let sorted;
        let data = match &positions {
            Some(p) if !p.windows(2).all(|w| w[0] <= w[1]) => {
                let mut order: Vec<u32> = (0..p.len() as u32).collect();
                order.sort_by_key(|&i| p[i as usize]);
                let in_order: Arc<[u64]> = order.iter().map(|&i| p[i as usize]).collect();
                sorted = arrow::compute::take_record_batch(&batch.data, &UInt32Array::from(order))
                    .map_err(|e| Error::arrow(&self.component, e))?;
                positions = Some(in_order);
                &sorted
            }
            _ => &batch.data,
        };
        let times = match self.time_column {
            Some(i) => Some(self.row_times(data, i)?),
            None => None,
        };
        let max_age = i64::try_from(self.settings.max_age.as_micros()).unwrap_or(i64::MAX);
        let shard = batch.shard.file_token();
        let batch_no = {
            let n = self.shard_batches.entry(shard.clone()).or_default();
            *n += 1;
            *n
        };
        if self.settings.exactly_once {
            if !self.manifests.contains_key(&shard) {
                let manifest = self.read_manifest(&shard)?;
                self.manifests.insert(shard.clone(), manifest);
            }
            self.batches_written += 1;
            let manifest = self.manifests.get_mut(&shard).expect("inserted above");
            manifest.used = self.batches_written;
            if manifest.source.is_empty() {
                manifest.source = batch.shard.source.clone();
            } else if manifest.source != batch.shard.source {
                return Err(Error::Internal {
                    component: self.component.clone(),
                    message: format!(
                        "exactly_once: sources `{}` and `{}` both have a shard named `{}`, and their positions \
                         would be taken for one another's; write them to separate sinks or turn exactly_once off",
                        manifest.source, batch.shard.source, batch.shard.id
                    ),
                });
            }
            if let Some(version) = batch.shard.version() {
                // A manifest without a version (new, or an earlier build's) is this version's.
                let held = manifest.shard_version.get_or_insert_with(|| version.to_string());
                if held.as_str() != version {
                    self.start_version(&shard, version)?;
                }
            }
        }
        // Sorted above: the first is the lowest.
        self.in_progress = positions.as_ref().and_then(|p| p.first()).map(|&m| (shard.clone(), m));
        for group in self.split(data)? {
            // Rows a committed file already holds (a replay after a crash) are skipped.
            let group = match (&positions, self.manifests.get(&shard).and_then(|m| m.done(&group.folder))) {
                (Some(p), Some(done)) => match self.skip_durable(group, p, done)? {
                    Some(g) => g,
                    None => continue,
                },
                _ => group,
            };
            let key = (group.folder.clone(), shard.clone());
            let n = group.data.num_rows();
            let mut at = 0;
            while at < n {
                if !self.open.contains_key(&key) {
                    let first = positions.as_ref().map_or(batch.first, |p| p[group.input_row(at)]);
                    self.open_for(&key, &batch.shard, &group.data, first)?;
                }
                let file = self.open.get_mut(&key).expect("opened above");
                let mut take = n - at;
                if let Some(m) = self.settings.max_rows {
                    take = take.min(m.saturating_sub(file.rows).max(1) as usize);
                }
                let mut aged = false;
                if let Some(t) = &times {
                    if file.first_time.is_none() {
                        file.first_time = (at..at + take).find_map(|i| t[group.input_row(i)]);
                    }
                    if let Some(start) = file.first_time {
                        let limit = start.saturating_add(max_age);
                        if let Some(i) = (at..at + take).find(|&i| t[group.input_row(i)].is_some_and(|v| v >= limit)) {
                            take = i - at;
                            aged = true;
                        }
                    }
                }
                if take > 0 {
                    let data = if take == n { group.data.clone() } else { group.data.slice(at, take) };
                    file.encoder.write(&data, self.settings.row_group_bytes).map_err(|e| Error::Internal {
                        component: self.component.clone(),
                        message: format!("encoding {}: {e}", file.name),
                    })?;
                    file.drain()?;
                    file.rows += take as u64;
                    file.acks.push(batch.ack.clone());
                    file.last_batch = batch_no;
                    if let Some(p) = &positions {
                        file.last_position = Some(p[group.input_row(at + take - 1)]);
                    }
                    at += take;
                }
                let full = aged
                    || self.settings.max_rows.is_some_and(|m| file.rows >= m)
                    || file.size() >= self.settings.max_bytes;
                if full {
                    self.close(&key)?;
                }
            }
        }
        self.close_idle(&shard, batch_no)?;
        self.enforce_limits()?;
        self.in_progress = None;
        self.forget_closed_shards();
        Ok(())
    }

    /// A shard's clock and manifest only matter to its open files: an endless run over
    /// ever-new shards (S3 objects) kept one of each per shard it ever wrote. Done between
    /// batches, never within one (a clock restarted mid-batch would date the batch's new files in
    /// the old count). Past [`MANIFESTS_KEPT`], the least recently used manifests of shards
    /// without open files are dropped, down to half that, and read again (one GET) with their
    /// shard's next batch: fewer are kept, so a few Kafka partitions whose files close every
    /// batch do not pay a read per batch.
    fn forget_closed_shards(&mut self) {
        let open = &self.open;
        if self.shard_batches.len() > open.len() {
            self.shard_batches.retain(|shard, _| open.keys().any(|k| &k.1 == shard));
        }
        if self.manifests.len() > MANIFESTS_KEPT {
            let open: std::collections::HashSet<&String> = open.keys().map(|k| &k.1).collect();
            let mut closed: Vec<(u64, String)> = self
                .manifests
                .iter()
                .filter(|(shard, _)| !open.contains(shard))
                .map(|(shard, m)| (m.used, shard.clone()))
                .collect();
            closed.sort_unstable();
            let excess = self.manifests.len().saturating_sub(MANIFESTS_KEPT / 2);
            for (_, shard) in closed.into_iter().take(excess) {
                self.manifests.remove(&shard);
            }
        }
    }

    /// Closes the files of `shard` that its last `max_idle_batches` batches did not write to.
    /// Safe with `exactly_once` as any other cut: a replay skips what the manifest holds and
    /// starts the folder's next file at the same row.
    fn close_idle(&mut self, shard: &str, batch_no: u64) -> Result<()> {
        let idle = self.settings.max_idle_batches;
        if idle == 0 {
            return Ok(());
        }
        let mut expired: Vec<_> = self
            .open
            .iter()
            .filter(|(k, f)| k.1 == shard && batch_no.saturating_sub(f.last_batch) >= idle)
            .map(|(k, _)| k.clone())
            .collect();
        expired.sort();
        for key in expired {
            self.close(&key)?;
        }
        Ok(())
    }

    /// Opens the file for `key`, closing the largest open file first when at `max_open_files`.
    fn open_for(&mut self, key: &(String, String), shard: &ShardInfo, data: &RecordBatch, first: u64) -> Result<()> {
        // Make room first, so a batch spread over many folders never exceeds the cap.
        while self.open.len() >= self.settings.max_open_files {
            let Some(largest) = self.open.iter().max_by_key(|(_, f)| f.size()).map(|(k, _)| k.clone()) else {
                break;
            };
            self.close(&largest)?;
        }
        if self.plain_columns.is_none()
            && self.settings.format == OutputFormat::Parquet
            && self.settings.adaptive_dictionary
        {
            self.plain_columns = high_cardinality_columns(data);
        }
        let file = self.open_file(&key.0, &key.1, shard, first)?;
        self.open.insert(key.clone(), file);
        Ok(())
    }

    /// `shard`'s content changed (an object rewritten under its key): its rows start again at
    /// the first position. The files still open hold the old version's rows and are committed
    /// under it first; then nothing of the new version is durable yet.
    fn start_version(&mut self, shard: &str, version: &str) -> Result<()> {
        let mut old: Vec<_> = self.open.keys().filter(|k| k.1 == shard).cloned().collect();
        old.sort();
        for key in old {
            self.close(&key)?;
        }
        let manifest = self.manifests.get_mut(shard).expect("read before");
        tracing::info!(
            component = %self.component, shard,
            "the shard's content changed (version {} before, {version} now): writing it again from its first position",
            manifest.shard_version.as_deref().unwrap_or_default()
        );
        manifest.shard_version = Some(version.to_string());
        manifest.durable_below = 0;
        manifest.folders.clear();
        Ok(())
    }

    fn manifest_name(shard: &str) -> String {
        format!("{MANIFEST_DIR}/{shard}.json")
    }

    fn read_manifest(&mut self, shard: &str) -> Result<Manifest> {
        let name = Self::manifest_name(shard);
        match self.factory.read(&name)? {
            None => Ok(Manifest::default()),
            Some(bytes) => {
                let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Internal {
                    component: self.component.clone(),
                    message: format!(
                        "the exactly-once manifest {name} is damaged ({e}); it must be restored or the output rewritten"
                    ),
                })?;
                if m.version > MANIFEST_VERSION {
                    return Err(Error::Internal {
                        component: self.component.clone(),
                        message: format!(
                            "the exactly-once manifest {name} is version {}, written by a newer sluice (this one reads up to {MANIFEST_VERSION})",
                            m.version
                        ),
                    });
                }
                Ok(m)
            }
        }
    }

    /// `group` without the rows at or before `done` (already in a committed file); `None` when
    /// nothing is left.
    fn skip_durable(&self, group: Group, positions: &[u64], done: u64) -> Result<Option<Group>> {
        let n = group.data.num_rows();
        let keep: Vec<u32> = (0..n).filter(|&i| positions[group.input_row(i)] > done).map(|i| i as u32).collect();
        if keep.len() == n {
            return Ok(Some(group));
        }
        if keep.is_empty() {
            return Ok(None);
        }
        let rows: UInt32Array = keep.iter().map(|&i| group.input_row(i as usize) as u32).collect();
        let data = arrow::compute::take_record_batch(&group.data, &UInt32Array::from(keep))
            .map_err(|e| Error::arrow(&self.component, e))?;
        Ok(Some(Group { folder: group.folder, data, rows: Some(rows) }))
    }

    /// Records that `folder` of `shard` is durable up to `position`, before any later file of
    /// that folder can be committed (the file is already out of `open`).
    ///
    /// A shard's rows reach the writer in position order, so every row before the first row of
    /// its open files, of the batch being written and past this file is durable: the manifest
    /// keeps that as `durable_below` and drops the folders it covers.
    fn write_manifest(&mut self, shard: &str, folder: &str, position: u64) -> Result<()> {
        let floor = self
            .open
            .iter()
            .filter(|(k, _)| k.1 == shard)
            .filter_map(|(_, f)| f.first_position)
            .chain(self.in_progress.as_ref().filter(|(s, _)| s == shard).map(|(_, first)| *first))
            .fold(position.saturating_add(1), u64::min);
        let manifest = self.manifests.entry(shard.to_string()).or_default();
        manifest.version = MANIFEST_VERSION;
        manifest.durable_below = manifest.durable_below.max(floor);
        manifest.folders.insert(folder.to_string(), position);
        let below = manifest.durable_below;
        manifest.folders.retain(|_, last| *last >= below);
        let bytes = serde_json::to_vec(manifest).map_err(|e| Error::Internal {
            component: self.component.clone(),
            message: format!("encoding the manifest: {e}"),
        })?;
        let mut dest = self.factory.create(&Self::manifest_name(shard))?;
        if let Err(e) = dest.write(&bytes) {
            dest.abort();
            return Err(e);
        }
        dest.commit()
    }

    /// The source position of each row: kept by the source, or in the `_offset` column.
    fn row_positions(&self, batch: &Batch) -> Result<Arc<[u64]>> {
        row_positions(&self.component, batch)
    }

    /// Each row's record time in µs since the epoch (`None` for nulls).
    fn row_times(&self, data: &RecordBatch, idx: usize) -> Result<Vec<Option<i64>>> {
        use arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
        let cast = arrow::compute::cast(data.column(idx), &DataType::Timestamp(TimeUnit::Microsecond, None))
            .map_err(|e| Error::arrow(&self.component, e))?;
        Ok(arrow::array::AsArray::as_primitive::<TimestampMicrosecondType>(&cast).iter().collect())
    }

    /// Closes files open longer than `max_age`.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub fn close_expired(&mut self) -> Result<()> {
        if self.time_column.is_some() {
            // Age is record time then (see `write`).
            return Ok(());
        }
        let max_age = self.settings.max_age;
        let expired: Vec<_> =
            self.open.iter().filter(|(_, f)| f.opened.elapsed() >= max_age).map(|(k, _)| k.clone()).collect();
        for key in expired {
            self.close(&key)?;
        }
        Ok(())
    }

    /// Commits every open file.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub fn finish(&mut self) -> Result<()> {
        let mut keys: Vec<_> = self.open.keys().cloned().collect();
        keys.sort();
        for key in keys {
            self.close(&key)?;
        }
        Ok(())
    }

    /// Removes every open file's partial output; their records are not acknowledged.
    pub fn abort(&mut self) {
        for (_, file) in self.open.drain() {
            file.dest.abort();
            file.acks.into_iter().for_each(Ack::abandon);
        }
    }

    /// Bytes buffered in memory across open files (row groups in progress and destination
    /// buffers).
    pub fn buffered(&self) -> u64 {
        self.open.values().map(|f| f.encoder.buffered() + f.dest.buffered()).sum()
    }

    /// Files open now.
    pub fn open_files(&self) -> usize {
        self.open.len()
    }

    /// Opens the file of `shard` (its name token `token`) in `folder`.
    fn open_file(&mut self, folder: &str, token: &str, shard: &ShardInfo, first: u64) -> Result<OpenFile> {
        // Output names carry the content version too: a rewritten object's files start at the
        // same positions as the old version's, and must not replace them.
        let stem = match shard.version_tag() {
            Some(tag) => format!("{token}-{tag}"),
            None => token.to_string(),
        };
        // Two files can start at the same position (two inputs derived from one source batch, dead
        // letters without positions): number the later ones, in arrival order, so names stay
        // deterministic for the same input and nothing is overwritten.
        let ext = self.extension();
        let mut name = format!("{folder}part-{stem}-{first:020}.{ext}");
        let mut n = 1;
        while self.names_used.contains(&name) {
            name = format!("{folder}part-{stem}-{first:020}-{n}.{ext}");
            n += 1;
        }
        if self.names_used.len() == RECENT_NAMES {
            self.names_used.pop_front();
        }
        self.names_used.push_back(name.clone());
        let buf = SharedBuf::default();
        let plain = self.plain_columns.as_deref().unwrap_or_default();
        let encoder = Encoder::new(&self.settings, &self.file_schema, plain, buf.clone()).map_err(|e| {
            Error::Internal { component: self.component.clone(), message: format!("creating {name}: {e}") }
        })?;
        let dest = self.factory.create(&name)?;
        Ok(OpenFile {
            name,
            encoder,
            buf,
            dest,
            rows: 0,
            written: 0,
            opened: Instant::now(),
            first_time: None,
            first_position: self.settings.exactly_once.then_some(first),
            last_position: None,
            last_batch: self.shard_batches.get(token).copied().unwrap_or_default(),
            acks: Vec::new(),
        })
    }

    fn extension(&self) -> String {
        let ext = self.settings.format.extension();
        match (self.settings.format, self.settings.compression) {
            (OutputFormat::Json | OutputFormat::Csv, Compression::Gzip) => format!("{ext}.gz"),
            _ => ext.to_string(),
        }
    }

    fn close(&mut self, key: &(String, String)) -> Result<()> {
        let Some(mut file) = self.open.remove(key) else { return Ok(()) };
        let name = file.name.clone();
        let finished = std::mem::replace(
            &mut file.encoder,
            Encoder::Json(Box::new(arrow::json::LineDelimitedWriter::new(TextOut::Plain(SharedBuf::default())))),
        );
        let written = finished
            .finish()
            .map_err(|e| Error::Internal {
                component: self.component.clone(),
                message: format!("finishing {name}: {e}"),
            })
            .and_then(|_| file.drain());
        // Worker mode: a file of a shard that moved away, or written past the lease, is not
        // published (its new owner writes the same records again).
        let written = written.and_then(|()| match file.acks.first().map(|a| crate::fence::check(a.shard())) {
            Some(Err(why)) => Err(Error::Fenced {
                component: self.component.clone(),
                message: format!("not publishing {name}: {why}"),
            }),
            _ => Ok(()),
        });
        let committed = match written {
            Ok(()) => file.dest.commit(),
            Err(e) => {
                file.dest.abort();
                Err(e)
            }
        };
        // Exactly-once: the manifest says the folder is durable up to the file's last row
        // before anything else of it is written (a crash in between rewrites this same file).
        let committed = match (committed, self.settings.exactly_once, file.last_position) {
            (Ok(()), true, Some(last)) => self.write_manifest(&key.1, &key.0, last),
            (r, _, _) => r,
        };
        if let Err(e) = committed {
            // Not durable: its records must not count as delivered.
            file.acks.into_iter().for_each(Ack::abandon);
            return Err(e);
        }
        self.files_written.increment(1);
        tracing::debug!(component = %self.component, file = %name, rows = file.rows, bytes = file.written, "file committed");
        // Dropping the acks here, after the commit, is what lets source positions advance.
        drop(file.acks);
        Ok(())
    }

    /// Keeps buffered memory under `buffer_bytes` (flushing the largest row group, or relieving
    /// the largest destination buffer, first) and open files under `max_open_files` (closing the
    /// largest first).
    fn enforce_limits(&mut self) -> Result<()> {
        // Each step empties one buffer, so this ends; the bound guards against a destination
        // that cannot give memory back.
        let mut steps = 2 * self.open.len() + 1;
        while self.buffered() > self.settings.buffer_bytes && steps > 0 {
            steps -= 1;
            let largest = self
                .open
                .iter()
                .flat_map(|(k, f)| [((k.clone(), false), f.encoder.buffered()), ((k.clone(), true), f.dest.buffered())])
                .max_by_key(|(_, size)| *size);
            let Some(((key, dest), size)) = largest else { break };
            // A row group much smaller than the budget's share costs more in the footer
            // metadata every open file keeps until it closes than it frees: with too many open
            // files for the budget, close the largest instead.
            if !dest && size < self.min_row_group() && self.open.len() > 1 {
                self.close(&key)?;
                continue;
            }
            let file = self.open.get_mut(&key).expect("key from the map");
            if dest {
                file.dest.relieve()?;
            } else {
                file.encoder.flush_row_group().map_err(|e| Error::Internal {
                    component: self.component.clone(),
                    message: format!("flushing {}: {e}", file.name),
                })?;
                file.drain()?;
            }
        }
        while self.open.len() > self.settings.max_open_files {
            let Some(key) = self.open.iter().max_by_key(|(_, f)| f.size()).map(|(k, _)| k.clone()) else { break };
            self.close(&key)?;
        }
        Ok(())
    }

    /// Smallest row group flushed to relieve memory: a 64th of `buffer_bytes` (the share of each
    /// of the default 64 open files), at least 64 KiB, at most `row_group_bytes`. Smaller row
    /// groups cost more in footer metadata, kept until the file closes, than they free.
    fn min_row_group(&self) -> u64 {
        (self.settings.buffer_bytes / 64).max(64 << 10).min(self.settings.row_group_bytes)
    }

    /// Splits `data` by the partition columns into (`col=value/…/` folder, rows without the
    /// partition columns).
    fn split(&self, data: &RecordBatch) -> Result<Vec<Group>> {
        let projected = data.project(&self.data_columns).map_err(|e| Error::arrow(&self.component, e))?;
        if self.partition_columns.is_empty() {
            return Ok(vec![Group { folder: String::new(), data: projected, rows: None }]);
        }
        let options = FormatOptions::default().with_null(NULL_PARTITION);
        let columns: Vec<(&str, ArrayRef)> = self
            .partition_columns
            .iter()
            .map(|&i| (data.schema_ref().field(i).name().as_str(), data.column(i).clone()))
            .collect();
        let formatters = columns
            .iter()
            .map(|(_, a)| ArrayFormatter::try_new(a.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::arrow(&self.component, e))?;
        let mut groups: IndexMap<String, Vec<u32>> = IndexMap::new();
        let mut key = String::new();
        for row in 0..data.num_rows() {
            key.clear();
            for ((name, array), f) in columns.iter().zip(&formatters) {
                key.push_str(name);
                key.push('=');
                if array.is_null(row) {
                    key.push_str(NULL_PARTITION);
                } else {
                    escape_segment(&f.value(row).to_string(), &mut key);
                }
                key.push('/');
            }
            match groups.get_mut(key.as_str()) {
                Some(rows) => rows.push(row as u32),
                None => {
                    groups.insert(key.clone(), vec![row as u32]);
                }
            }
        }
        if groups.len() == 1 {
            let (folder, _) = groups.into_iter().next().expect("one group");
            return Ok(vec![Group { folder, data: projected, rows: None }]);
        }
        groups
            .into_iter()
            .map(|(folder, rows)| {
                let idx = UInt32Array::from(rows);
                arrow::compute::take_record_batch(&projected, &idx)
                    .map(|data| Group { folder, data, rows: Some(idx) })
                    .map_err(|e| Error::arrow(&self.component, e))
            })
            .collect()
    }
}

/// Percent-encodes a partition value for a path segment (as Hive does): everything but ASCII
/// letters, digits and `-_.` (and a leading `.`, which would hide the folder).
fn escape_segment(value: &str, out: &mut String) {
    for (i, b) in value.bytes().enumerate() {
        let safe = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if safe {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The source position of each row: kept by the source, or in the `_offset` column.
pub(crate) fn row_positions(component: &str, batch: &Batch) -> Result<Arc<[u64]>> {
    if let Some(p) = &batch.row_positions {
        return Ok(p.clone());
    }
    let col = batch.data.column_by_name(POSITION_COLUMN).ok_or_else(|| Error::Internal {
        component: component.to_string(),
        message: format!(
            "exactly_once needs the source position of every row, but the rows from {} no \
             longer carry their positions (a SQL transform dropped them): select the Kafka `{POSITION_COLUMN}` \
             metadata column through the transform, or turn exactly_once off",
            batch.shard.id
        ),
    })?;
    let cast = arrow::compute::cast(col, &arrow::datatypes::DataType::Int64).map_err(|e| Error::arrow(component, e))?;
    let ints = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&cast);
    if arrow::array::Array::null_count(ints) > 0 {
        return Err(Error::Internal {
            component: component.to_string(),
            message: format!("column `{POSITION_COLUMN}` has nulls; exactly_once needs every row's position"),
        });
    }
    Ok(ints.values().iter().map(|&v| v as u64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{RecordingCommitter, ShardInfo, ShardKind, ShardProgress};
    use crate::source::generator::{generate, shape_schema, Shape};
    use arrow::array::AsArray;
    use std::sync::atomic::AtomicBool;

    /// Keeps bytes in memory; `commit` fails when told to.
    struct MemDest {
        fail_commit: bool,
        committed: Arc<Mutex<Vec<(String, usize)>>>,
        name: String,
        bytes: Vec<u8>,
    }
    impl Destination for MemDest {
        fn write(&mut self, bytes: &[u8]) -> Result<()> {
            self.bytes.extend_from_slice(bytes);
            Ok(())
        }
        fn commit(self: Box<Self>) -> Result<()> {
            if self.fail_commit {
                return Err(Error::Internal { component: "t".into(), message: "disk full".into() });
            }
            self.committed.lock().unwrap().push((self.name.clone(), self.bytes.len()));
            Ok(())
        }
        fn abort(self: Box<Self>) {}
    }
    struct MemFactory(bool, Arc<Mutex<Vec<(String, usize)>>>);
    impl DestinationFactory for MemFactory {
        fn create(&mut self, relative: &str) -> Result<Box<dyn Destination>> {
            Ok(Box::new(MemDest {
                fail_commit: self.0,
                committed: self.1.clone(),
                name: relative.into(),
                bytes: vec![],
            }))
        }
        fn read(&mut self, _relative: &str) -> Result<Option<Vec<u8>>> {
            Ok(None)
        }
    }

    fn settings() -> WriterSettings {
        WriterSettings {
            format: OutputFormat::Parquet,
            compression: Compression::Zstd,
            partition_by: vec![],
            max_rows: None,
            max_bytes: DEFAULT_MAX_FILE_BYTES.0,
            max_age: DEFAULT_MAX_AGE,
            max_idle_batches: DEFAULT_MAX_IDLE_BATCHES,
            row_group_bytes: DEFAULT_ROW_GROUP_BYTES.0,
            buffer_bytes: DEFAULT_BUFFER_BYTES.0,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            adaptive_dictionary: false,
            exactly_once: false,
            time_column: None,
        }
    }

    fn batch(progress: &Arc<ShardProgress>, start: u64, end: u64) -> Batch {
        let schema = shape_schema(Shape::Orders);
        Batch {
            data: generate(Shape::Orders, &schema, 0, start, end),
            shard: progress.shard().clone(),
            first: start,
            last: end - 1,
            row_positions: None,
            ack: progress.register(end - 1),
            memory: None,
        }
    }

    fn progress() -> Arc<ShardProgress> {
        let shard =
            Arc::new(ShardInfo { source: "g".into(), id: "gen-0".into(), kind: ShardKind::Sequence, epoch: None });
        ShardProgress::new(shard, Arc::new(RecordingCommitter::default()), Arc::new(AtomicBool::new(false)))
    }

    #[test]
    fn positions_commit_only_when_the_file_is_committed() {
        let committed = Arc::new(Mutex::new(vec![]));
        let schema = shape_schema(Shape::Orders);
        let mut w =
            RollingWriter::new("t", &schema, settings(), Box::new(MemFactory(false, committed.clone()))).unwrap();
        let p = progress();
        w.write(&batch(&p, 0, 100)).unwrap();
        w.write(&batch(&p, 100, 200)).unwrap();
        assert_eq!(p.committed(), None, "the file is still open");
        w.finish().unwrap();
        assert_eq!(p.committed(), Some(199));
        let files = committed.lock().unwrap().clone();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, "part-gen-0-00000000000000000000.parquet");
        assert!(files[0].1 > 0);
    }

    #[test]
    fn a_failed_commit_or_an_abort_commits_nothing() {
        let schema = shape_schema(Shape::Orders);
        let mut w = RollingWriter::new("t", &schema, settings(), Box::new(MemFactory(true, Arc::default()))).unwrap();
        let p = progress();
        w.write(&batch(&p, 0, 100)).unwrap();
        let err = w.finish().unwrap_err().to_string();
        assert!(err.contains("disk full"), "{err}");
        assert_eq!(p.committed(), None, "records of a file that failed to commit are not delivered");

        let mut w = RollingWriter::new("t", &schema, settings(), Box::new(MemFactory(false, Arc::default()))).unwrap();
        let p = progress();
        w.write(&batch(&p, 0, 100)).unwrap();
        w.abort();
        assert_eq!(p.committed(), None);
    }

    #[test]
    fn same_first_position_twice_gets_a_new_name() {
        let committed = Arc::new(Mutex::new(vec![]));
        let schema = shape_schema(Shape::Orders);
        let s = WriterSettings { max_rows: Some(10), ..settings() };
        let mut w = RollingWriter::new("t", &schema, s, Box::new(MemFactory(false, committed.clone()))).unwrap();
        let p = progress();
        let b = batch(&p, 0, 10);
        w.write(&b).unwrap();
        w.write(&b).unwrap();
        let names: Vec<String> = committed.lock().unwrap().iter().map(|f| f.0.clone()).collect();
        assert_eq!(names, ["part-gen-0-00000000000000000000.parquet", "part-gen-0-00000000000000000000-1.parquet"]);
    }

    /// Keeps committed files by name, and reads them back.
    #[derive(Clone, Default)]
    struct Store(Arc<Mutex<HashMap<String, Vec<u8>>>>);
    struct StoreDest(Store, String, Vec<u8>);
    impl Destination for StoreDest {
        fn write(&mut self, bytes: &[u8]) -> Result<()> {
            self.2.extend_from_slice(bytes);
            Ok(())
        }
        fn commit(self: Box<Self>) -> Result<()> {
            self.0 .0.lock().unwrap().insert(self.1.clone(), self.2.clone());
            Ok(())
        }
        fn abort(self: Box<Self>) {}
    }
    impl DestinationFactory for Store {
        fn create(&mut self, relative: &str) -> Result<Box<dyn Destination>> {
            Ok(Box::new(StoreDest(self.clone(), relative.into(), vec![])))
        }
        fn read(&mut self, relative: &str) -> Result<Option<Vec<u8>>> {
            Ok(self.0.lock().unwrap().get(relative).cloned())
        }
    }

    #[test]
    fn exactly_once_replay_skips_rows_in_committed_files_and_reuses_names() {
        let store = Store::default();
        let schema = shape_schema(Shape::Orders);
        let s = WriterSettings { max_rows: Some(50), exactly_once: true, ..settings() };
        let mut w = RollingWriter::new("t", &schema, s.clone(), Box::new(store.clone())).unwrap();
        let p = progress();
        w.write(&positioned(batch(&p, 0, 120))).unwrap();
        // A crash: the file holding 100..119 never completes.
        let mut names: Vec<String> = store.0.lock().unwrap().keys().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "_sluice/manifests/gen-0.json",
                "part-gen-0-00000000000000000000.parquet",
                "part-gen-0-00000000000000000050.parquet"
            ]
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&store.0.lock().unwrap()["_sluice/manifests/gen-0.json"]).unwrap();
        assert_eq!(manifest["folders"][""], 99);

        // The replay starts from an earlier committed position (60): rows up to 99 are skipped.
        let mut w = RollingWriter::new("t", &schema, s, Box::new(store.clone())).unwrap();
        let p = progress();
        w.write(&positioned(batch(&p, 60, 180))).unwrap();
        w.finish().unwrap();
        let files = store.0.lock().unwrap().clone();
        let mut names: Vec<&String> = files.keys().filter(|k| k.ends_with(".parquet")).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "part-gen-0-00000000000000000000.parquet",
                "part-gen-0-00000000000000000050.parquet",
                "part-gen-0-00000000000000000100.parquet",
                "part-gen-0-00000000000000000150.parquet"
            ]
        );
        let rows = |name: &str| read_back(&files[name]).iter().map(RecordBatch::num_rows).sum::<usize>();
        assert_eq!(rows("part-gen-0-00000000000000000100.parquet"), 50);
        assert_eq!(rows("part-gen-0-00000000000000000150.parquet"), 30);
        assert_eq!(p.committed(), Some(179));
    }

    /// A batch of `rows` rows of day `day` (a `day` column to partition by and a value).
    fn day_batch(progress: &Arc<ShardProgress>, day: &str, start: u64, rows: u64) -> Batch {
        use arrow::array::{Int64Array, StringArray};
        use arrow::datatypes::{DataType, Field};
        let schema = Arc::new(Schema::new(vec![
            Field::new("day", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let days: StringArray = (0..rows).map(|_| Some(day)).collect();
        let values: Int64Array = (start..start + rows).map(|v| v as i64).collect();
        Batch {
            data: RecordBatch::try_new(schema, vec![Arc::new(days), Arc::new(values)]).unwrap(),
            shard: progress.shard().clone(),
            first: start,
            last: start + rows - 1,
            row_positions: None,
            ack: progress.register(start + rows - 1),
            memory: None,
        }
    }

    #[test]
    fn a_folder_its_shard_stopped_writing_to_is_closed_after_max_idle_batches() {
        let committed = Arc::new(Mutex::new(vec![]));
        let p = progress();
        let schema = day_batch(&p, "d", 0, 1).data.schema();
        let s = WriterSettings { partition_by: vec!["day".into()], max_idle_batches: 3, ..settings() };
        let mut w = RollingWriter::new("t", &schema, s, Box::new(MemFactory(false, committed.clone()))).unwrap();
        let names = || committed.lock().unwrap().iter().map(|f| f.0.clone()).collect::<Vec<_>>();
        // Day 1 in batches 1-2, then day 2: day 1 is idle in batches 3, 4 and 5.
        w.write(&day_batch(&p, "1", 0, 10)).unwrap();
        w.write(&day_batch(&p, "1", 10, 10)).unwrap();
        w.write(&day_batch(&p, "2", 20, 10)).unwrap();
        w.write(&day_batch(&p, "2", 30, 10)).unwrap();
        assert_eq!(w.open_files(), 2, "day 1 has been idle for two batches: still open");
        // Another shard's batches do not count against this shard's files.
        let other = {
            let shard =
                Arc::new(ShardInfo { source: "g".into(), id: "gen-1".into(), kind: ShardKind::Sequence, epoch: None });
            ShardProgress::new(shard, Arc::new(RecordingCommitter::default()), Arc::new(AtomicBool::new(false)))
        };
        for i in 0..5 {
            w.write(&day_batch(&other, "2", i * 10, 10)).unwrap();
        }
        assert_eq!(w.open_files(), 3);
        assert!(names().is_empty(), "{:?}", names());
        w.write(&day_batch(&p, "2", 40, 10)).unwrap();
        assert_eq!(names(), ["day=1/part-gen-0-00000000000000000000.parquet"]);
        assert_eq!(p.committed(), Some(19), "day 1's records are committed; day 2 is still open");
        w.finish().unwrap();
        assert_eq!(p.committed(), Some(49));

        // 0 keeps idle files open.
        let committed = Arc::new(Mutex::new(vec![]));
        let s = WriterSettings { partition_by: vec!["day".into()], max_idle_batches: 0, ..settings() };
        let mut w = RollingWriter::new("t", &schema, s, Box::new(MemFactory(false, committed.clone()))).unwrap();
        let p = progress();
        w.write(&day_batch(&p, "1", 0, 10)).unwrap();
        for i in 1..40 {
            w.write(&day_batch(&p, "2", i * 10, 10)).unwrap();
        }
        assert_eq!(w.open_files(), 2);
        assert!(committed.lock().unwrap().is_empty());
    }

    /// The rows of a Parquet file the writer made.
    fn read_back(bytes: &[u8]) -> Vec<RecordBatch> {
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(bytes))
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// `b` with its rows' source positions, as the Kafka source gives them.
    fn positioned(b: Batch) -> Batch {
        let p: Arc<[u64]> = (b.first..=b.last).collect();
        Batch { row_positions: Some(p), ..b }
    }

    #[test]
    fn an_exactly_once_manifest_keeps_only_the_folders_its_open_files_need() {
        let store = Store::default();
        let p = progress();
        let schema = day_batch(&p, "d", 0, 1).data.schema();
        let s = WriterSettings { partition_by: vec!["day".into()], exactly_once: true, ..settings() };
        let manifest = |store: &Store| -> serde_json::Value {
            serde_json::from_slice(&store.0.lock().unwrap()["_sluice/manifests/gen-0.json"]).unwrap()
        };
        // A year and more of day folders, 10 rows each, one after another.
        let mut w = RollingWriter::new("t", &schema, s.clone(), Box::new(store.clone())).unwrap();
        for day in 0..1000u64 {
            w.write(&positioned(day_batch(&p, &format!("{day:04}"), day * 10, 10))).unwrap();
        }
        // Idle days are closed (max_idle_batches) and only the folders past the oldest open
        // file's first row stay in the manifest.
        assert_eq!(w.open_files(), 16);
        let m = manifest(&store);
        assert_eq!(m["version"], 2);
        assert_eq!(m["durable_below"], 9840, "the first row of day 984, the oldest open: {m}");
        let folders = m["folders"].as_object().unwrap();
        assert!(folders.is_empty(), "every completed day is below the open ones: {m}");
        assert_eq!(p.committed(), Some(9839));
        // A crash (the open days never complete); the source resumes at an older position.
        drop(w);
        let mut w = RollingWriter::new("t", &schema, s, Box::new(store.clone())).unwrap();
        let p = progress();
        for day in 900..1000u64 {
            w.write(&positioned(day_batch(&p, &format!("{day:04}"), day * 10, 10))).unwrap();
        }
        w.finish().unwrap();
        let files = store.0.lock().unwrap().clone();
        let parquet: Vec<&String> = files.keys().filter(|k| k.ends_with(".parquet")).collect();
        assert_eq!(parquet.len(), 1000, "one file per day, none twice");
        let rows: usize = parquet.iter().flat_map(|name| read_back(&files[*name])).map(|b| b.num_rows()).sum();
        assert_eq!(rows, 10_000, "every row exactly once");
        assert_eq!(manifest(&store)["durable_below"], 10_000);
        assert_eq!(p.committed(), Some(9999));

        // A folder committed past an older open file stays, and a replay skips its rows.
        let store = Store::default();
        let s =
            WriterSettings { partition_by: vec!["day".into()], exactly_once: true, max_rows: Some(5), ..settings() };
        let mut w = RollingWriter::new("t", &schema, s.clone(), Box::new(store.clone())).unwrap();
        let p = progress();
        w.write(&positioned(day_batch(&p, "a", 0, 3))).unwrap();
        w.write(&positioned(day_batch(&p, "b", 3, 5))).unwrap();
        let m = manifest(&store);
        assert_eq!((m["durable_below"].clone(), m["folders"]["day=b/"].clone()), (0.into(), 7.into()), "{m}");
        drop(w);
        let mut w = RollingWriter::new("t", &schema, s, Box::new(store.clone())).unwrap();
        let p = progress();
        w.write(&positioned(day_batch(&p, "a", 0, 3))).unwrap();
        w.write(&positioned(day_batch(&p, "b", 3, 5))).unwrap();
        w.finish().unwrap();
        let mut names: Vec<String> =
            store.0.lock().unwrap().keys().filter(|k| k.ends_with(".parquet")).cloned().collect();
        names.sort();
        assert_eq!(
            names,
            ["day=a/part-gen-0-00000000000000000000.parquet", "day=b/part-gen-0-00000000000000000003.parquet"]
        );
        let m = manifest(&store);
        assert_eq!((m["durable_below"].clone(), m["folders"]["day=b/"].clone()), (3.into(), 7.into()), "{m}");
    }

    #[test]
    fn exactly_once_puts_reordered_rows_back_in_source_order_and_keeps_sources_apart() {
        let store = Store::default();
        let schema = shape_schema(Shape::Orders);
        let s = WriterSettings { max_rows: Some(5), exactly_once: true, ..settings() };
        let mut w = RollingWriter::new("t", &schema, s.clone(), Box::new(store.clone())).unwrap();
        let p = progress();
        // As `ORDER BY ... DESC` with `_offset` kept gives them: positions 9, 8, ..., 0.
        let b = batch(&p, 0, 10);
        let reversed: UInt32Array = (0..10u32).rev().collect();
        let data = arrow::compute::take_record_batch(&b.data, &reversed).unwrap();
        let positions: Arc<[u64]> = (0..10u64).rev().collect();
        w.write(&Batch { data, row_positions: Some(positions), ..b }).unwrap();
        let files = store.0.lock().unwrap().clone();
        let mut names: Vec<&String> = files.keys().filter(|k| k.ends_with(".parquet")).collect();
        names.sort();
        assert_eq!(names, ["part-gen-0-00000000000000000000.parquet", "part-gen-0-00000000000000000005.parquet"]);
        let ids = |b: &RecordBatch| b.column(0).as_primitive::<arrow::datatypes::Int64Type>().values().to_vec();
        let first_ids = |name: &str| -> Vec<i64> { read_back(&files[name]).iter().flat_map(ids).collect() };
        let in_order = ids(&generate(Shape::Orders, &schema, 0, 0, 5));
        assert_eq!(first_ids("part-gen-0-00000000000000000000.parquet"), in_order, "rows 0-4, in source order");

        // Another source with a shard of the same name: refused, naming both.
        let other = {
            let shard =
                Arc::new(ShardInfo { source: "h".into(), id: "gen-0".into(), kind: ShardKind::Sequence, epoch: None });
            ShardProgress::new(shard, Arc::new(RecordingCommitter::default()), Arc::new(AtomicBool::new(false)))
        };
        let err = w.write(&positioned(batch(&other, 10, 20))).unwrap_err().to_string();
        assert!(err.contains("sources `g` and `h` both have a shard named `gen-0`"), "{err}");
        // Also once the first source's manifest is only in the store.
        let mut w = RollingWriter::new("t", &schema, s, Box::new(store.clone())).unwrap();
        let err = w.write(&positioned(batch(&other, 10, 20))).unwrap_err().to_string();
        assert!(err.contains("`g` and `h`"), "{err}");
    }

    #[test]
    fn exactly_once_writes_a_rewritten_object_again_under_names_of_its_own() {
        let store = Store::default();
        let schema = shape_schema(Shape::Orders);
        let s = WriterSettings { max_rows: Some(4), exactly_once: true, ..settings() };
        let object = |etag: &str| {
            let shard = Arc::new(ShardInfo {
                source: "s3".into(),
                id: "in/a.ndjson".into(),
                kind: ShardKind::File { path: "s3://b/in/a.ndjson".into(), version: Some(etag.into()) },
                epoch: None,
            });
            ShardProgress::new(shard, Arc::new(RecordingCommitter::default()), Arc::new(AtomicBool::new(false)))
        };
        let rows = |store: &Store| -> usize {
            let files = store.0.lock().unwrap().clone();
            files
                .iter()
                .filter(|(k, _)| k.ends_with(".parquet"))
                .flat_map(|(_, v)| read_back(v))
                .map(|b| b.num_rows())
                .sum()
        };
        let (v1, v2) = (object("\"e1\""), object("\"e2\""));
        let mut w = RollingWriter::new("t", &schema, s.clone(), Box::new(store.clone())).unwrap();
        w.write(&positioned(batch(&v1, 1, 7))).unwrap(); // rows 1-4 committed, 5-6 open
                                                         // The object is rewritten; its new content is read from the first position, within the
                                                         // same run: the old version's open file is committed first, and nothing is skipped.
        w.write(&positioned(batch(&v2, 1, 10))).unwrap();
        w.finish().unwrap();
        assert_eq!(rows(&store), 6 + 9, "every row of both versions");
        let name = format!("_sluice/manifests/{}.json", v1.shard().file_token());
        let manifest: serde_json::Value = serde_json::from_slice(&store.0.lock().unwrap()[&name]).unwrap();
        assert_eq!(manifest["shard_version"], "\"e2\"", "{manifest}");
        assert_eq!(manifest["durable_below"], 10, "{manifest}");
        let names = |store: &Store| -> Vec<String> {
            let mut n: Vec<String> =
                store.0.lock().unwrap().keys().filter(|k| k.ends_with(".parquet")).cloned().collect();
            n.sort();
            n
        };
        let (tag1, tag2) = (v1.shard().version_tag().unwrap(), v2.shard().version_tag().unwrap());
        assert_ne!(tag1, tag2);
        assert_eq!(names(&store).iter().filter(|n| n.contains(&tag1)).count(), 2, "{:?}", names(&store));
        assert_eq!(names(&store).iter().filter(|n| n.contains(&tag2)).count(), 3, "{:?}", names(&store));

        // Next run: the version the manifest holds is replayed and skipped; a third one is
        // written whole.
        let mut w = RollingWriter::new("t", &schema, s.clone(), Box::new(store.clone())).unwrap();
        w.write(&positioned(batch(&v2, 1, 10))).unwrap();
        w.finish().unwrap();
        assert_eq!(rows(&store), 15, "the replay of the held version adds nothing");
        let v3 = object("\"e3\"");
        let mut w = RollingWriter::new("t", &schema, s, Box::new(store.clone())).unwrap();
        w.write(&positioned(batch(&v3, 1, 3))).unwrap();
        w.finish().unwrap();
        assert_eq!(rows(&store), 17, "a version written after a restart, whole");
    }

    #[test]
    fn a_shards_batch_clock_and_manifest_are_dropped_with_its_last_open_file() {
        let store = Store::default();
        let schema = shape_schema(Shape::Orders);
        let s = WriterSettings { max_rows: Some(10), exactly_once: true, ..settings() };
        let mut w = RollingWriter::new("t", &schema, s, Box::new(store.clone())).unwrap();
        // One shard after another, as an endless run over new objects: each file rotates at
        // 10 rows, so no shard keeps an open file.
        let objects = MANIFESTS_KEPT + 100;
        for n in 0..objects {
            let shard = Arc::new(ShardInfo {
                source: "g".into(),
                id: format!("object-{n}"),
                kind: ShardKind::Sequence,
                epoch: None,
            });
            let p =
                ShardProgress::new(shard, Arc::new(RecordingCommitter::default()), Arc::new(AtomicBool::new(false)));
            w.write(&positioned(batch(&p, 0, 10))).unwrap();
            assert_eq!(p.committed(), Some(9));
        }
        let files = |store: &Store| store.0.lock().unwrap().keys().filter(|k| k.ends_with(".parquet")).count();
        assert_eq!(files(&store), objects);
        assert_eq!(w.open_files(), 0);
        assert!(w.shard_batches.is_empty(), "{} shard clocks kept", w.shard_batches.len());
        assert!(w.manifests.len() <= MANIFESTS_KEPT, "{} manifests kept", w.manifests.len());
        assert!(w.manifests.contains_key(&format!("object-{}", objects - 1)), "the most recent is kept");
        // A dropped manifest is read again: a replay of the first object (other values at the
        // same positions, to tell a rewrite) writes nothing.
        let name = "part-object-0-00000000000000000000.parquet";
        let before = store.0.lock().unwrap()[name].clone();
        let first =
            Arc::new(ShardInfo { source: "g".into(), id: "object-0".into(), kind: ShardKind::Sequence, epoch: None });
        assert!(!w.manifests.contains_key("object-0"));
        let p = ShardProgress::new(first, Arc::new(RecordingCommitter::default()), Arc::new(AtomicBool::new(false)));
        let other = Batch { data: generate(Shape::Orders, &schema, 1, 0, 10), ..batch(&p, 0, 10) };
        w.write(&positioned(other)).unwrap();
        w.finish().unwrap();
        assert_eq!(files(&store), objects);
        assert!(store.0.lock().unwrap()[name] == before, "the replayed rows were skipped, not written again");
        // A shard with an open file keeps its clock and manifest.
        let p = progress();
        w.write(&positioned(batch(&p, 0, 5))).unwrap();
        assert!(w.shard_batches.contains_key("gen-0") && w.manifests.contains_key("gen-0"));
    }

    #[test]
    fn partition_values_are_escaped_for_paths() {
        let mut s = String::new();
        escape_segment("2026-01-01 10:00:00", &mut s);
        assert_eq!(s, "2026-01-01%2010%3A00%3A00");
        s.clear();
        escape_segment("a/b", &mut s);
        assert_eq!(s, "a%2Fb");
        s.clear();
        escape_segment("..", &mut s);
        assert_eq!(s, "%2E.");
        s.clear();
        escape_segment("Zoë", &mut s);
        assert_eq!(s, "Zo%C3%AB");
    }
}
