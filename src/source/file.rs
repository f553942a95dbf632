//! The `file` source: NDJSON, CSV or Parquet files (a path or a glob, `.gz` for text formats), one
//! shard per file, read streaming.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use indexmap::IndexMap;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{Produced, ShardContext, Source};
use crate::batch::{ShardInfo, ShardKind};
use crate::config::types::schema_from_columns;
use crate::dead_letter::{BadRecord, Stage};
use crate::format::csv::{CsvDecoder, CsvOptions, RecordSplitter};
use crate::format::json::JsonDecoder;
use crate::format::{decode_chunk, ChunkDecoder, LineChunk};
use crate::{Error, Result};

/// Most bytes of text read into one batch.
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 16 << 20;
/// Longest record read; a longer one is dead-lettered (its first bytes kept) and skipped.
pub const MAX_RECORD_BYTES: usize = 8 << 20;
/// Bytes of an oversized record kept in its dead letter.
const OVERSIZED_RAW_BYTES: usize = 4096;
/// Records sampled when `schema = "infer"`.
pub const INFER_SAMPLE_RECORDS: usize = 1000;

/// `[sources.ID] type = "file"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// A file, or a glob such as `data/*.ndjson` (each file is a shard, read in name order).
    pub path: String,
    /// How the files are encoded.
    pub format: FileFormat,
    /// Column names and SQL types, or `"infer"` to infer them from the first records of the first
    /// file. Required for JSON and CSV; Parquet files carry their schema (a schema given here
    /// selects and casts columns).
    pub schema: Option<SchemaSpec>,
}

/// `format = { type = "json" | "csv" | "parquet" }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON object per line.
    Json(NoOptions),
    /// Comma (or `delimiter`) separated values.
    Csv(CsvOptions),
    /// Apache Parquet.
    Parquet(NoOptions),
}

/// A format without settings (rejects any key but `type`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

/// A schema written as a table of `column = "sql type"`, or `"infer"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaSpec {
    Infer,
    Columns(IndexMap<String, String>),
}

impl<'de> Deserialize<'de> for SchemaSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SchemaSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of `column = \"sql type\"` or the string \"infer\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SchemaSpec, E> {
                if v == "infer" {
                    Ok(SchemaSpec::Infer)
                } else {
                    Err(E::custom(format!("schema must be a table of columns or \"infer\", not \"{v}\"")))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SchemaSpec, A::Error> {
                let mut cols = IndexMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    cols.insert(k, v);
                }
                Ok(SchemaSpec::Columns(cols))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads files as shards.
pub struct FileSource {
    id: String,
    files: Vec<PathBuf>,
    format: FileFormat,
    schema: SchemaRef,
    /// For Parquet with a declared schema: the schema to cast to.
    cast_to: Option<SchemaRef>,
}

impl FileSource {
    /// Resolves the glob and the schema (reading a sample when inferring).
    ///
    /// # Errors
    /// `(key, message)` naming the setting at fault.
    pub fn new(id: &str, config: &FileSourceConfig) -> Result<Self, (&'static str, String)> {
        if let FileFormat::Csv(o) = &config.format {
            if !o.delimiter.is_ascii() {
                return Err((
                    "format.delimiter",
                    format!("the delimiter must be one ASCII character, not `{}`", o.delimiter),
                ));
            }
        }
        let files = expand(&config.path).map_err(|m| ("path", m))?;
        if let (FileFormat::Csv(_), Some(SchemaSpec::Columns(cols))) = (&config.format, &config.schema) {
            let schema = schema_from_columns(cols).map_err(|(col, m)| ("schema", format!("column `{col}`: {m}")))?;
            for f in schema.fields() {
                use arrow::datatypes::DataType;
                if matches!(f.data_type(), DataType::Binary | DataType::List(_) | DataType::Time64(_)) {
                    return Err((
                        "schema",
                        format!(
                            "column `{}`: CSV cannot hold {}; read it as varchar and convert it in SQL",
                            f.name(),
                            crate::config::types::sql_type_name(f.data_type())
                        ),
                    ));
                }
            }
        }
        let first = &files[0];
        let (schema, cast_to) = match (&config.format, &config.schema) {
            (_, Some(SchemaSpec::Columns(cols))) => {
                let s = schema_from_columns(cols).map_err(|(col, m)| ("schema", format!("column `{col}`: {m}")))?;
                match config.format {
                    FileFormat::Parquet(_) => {
                        for f in &files {
                            check_parquet_columns(f, &s).map_err(|m| ("schema", m))?;
                        }
                        (s.clone(), Some(s))
                    }
                    _ => (s, None),
                }
            }
            (FileFormat::Parquet(_), _) => (parquet_schema(first).map_err(|m| ("path", m))?, None),
            (format, Some(SchemaSpec::Infer)) => (infer(first, format).map_err(|m| ("schema", m))?, None),
            (_, None) => {
                return Err((
                    "schema",
                    "JSON and CSV files need a schema: add [sources.ID.schema] with `column = \"sql type\"` lines, or schema = \"infer\"".into(),
                ))
            }
        };
        Ok(FileSource { id: id.to_string(), files, format: config.format.clone(), schema, cast_to })
    }
}

fn expand(pattern: &str) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = glob::glob(pattern)
        .map_err(|e| format!("`{pattern}` is not a valid glob: {e}"))?
        .filter_map(|r| r.ok())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no files match `{pattern}` (relative paths start at the current directory)"));
    }
    Ok(files)
}

fn open_text(path: &Path) -> std::io::Result<Box<dyn BufRead + Send>> {
    Ok(text_input(File::open(path)?, path))
}

/// Buffered (and, for `.gz` names, decompressed) text of a file.
pub(crate) fn text_input(f: impl Read + Send + 'static, path: &Path) -> Box<dyn BufRead + Send> {
    let inner: Box<dyn Read + Send> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Box::new(BufReader::with_capacity(1 << 20, inner))
}

fn parquet_schema(path: &Path) -> Result<SchemaRef, String> {
    let f = File::open(path).map_err(|e| format!("cannot open `{}`: {e}", path.display()))?;
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .map(|b| b.schema().clone())
        .map_err(|e| format!("`{}` is not a readable Parquet file: {e}", path.display()))
}

/// Every declared column must exist in the (first) Parquet file.
fn check_parquet_columns(path: &Path, declared: &SchemaRef) -> Result<(), String> {
    let actual = parquet_schema(path)?;
    for f in declared.fields() {
        if actual.field_with_name(f.name()).is_err() {
            let have: Vec<&str> = actual.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(format!(
                "column `{}` is not in `{}`; the file has: {}",
                f.name(),
                path.display(),
                have.join(", ")
            ));
        }
    }
    Ok(())
}

fn infer(path: &Path, format: &FileFormat) -> Result<SchemaRef, String> {
    let reader = open_text(path).map_err(|e| format!("cannot open `{}` to infer its schema: {e}", path.display()))?;
    infer_from(reader, path, format)
}

/// Infers a schema from the first records of `reader` (the text of `path`).
pub(crate) fn infer_from(reader: impl BufRead, path: &Path, format: &FileFormat) -> Result<SchemaRef, String> {
    let schema = match format {
        FileFormat::Json(_) => {
            arrow::json::reader::infer_json_schema(reader, Some(INFER_SAMPLE_RECORDS)).map(|(s, _)| s)
        }
        FileFormat::Csv(o) => arrow::csv::reader::Format::default()
            .with_header(o.header)
            .with_delimiter(o.delimiter as u8)
            .infer_schema(reader, Some(INFER_SAMPLE_RECORDS))
            .map(|(s, _)| s),
        FileFormat::Parquet(_) => unreachable!("Parquet files carry their schema"),
    };
    schema.map(Arc::new).map_err(|e| format!("cannot infer a schema from `{}`: {e}", path.display()))
}

#[async_trait]
impl Source for FileSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    async fn shards(&self) -> Result<Vec<Arc<ShardInfo>>> {
        Ok(self
            .files
            .iter()
            .map(|p| {
                let path = p.display().to_string();
                Arc::new(ShardInfo {
                    source: self.id.clone(),
                    id: path.clone(),
                    kind: ShardKind::File { path, version: None },
                    epoch: None,
                })
            })
            .collect())
    }

    async fn read_shard(&self, ctx: ShardContext) -> Result<()> {
        let ShardKind::File { path, .. } = &ctx.shard.kind else {
            return Err(Error::Internal { component: self.id.clone(), message: "not a file shard".into() });
        };
        let path = PathBuf::from(path);
        let file = File::open(&path).map_err(|e| Error::io("cannot open", &path, e))?;
        let reader =
            open_reader(&self.id, file, &path, &self.format, &self.schema, self.cast_to.clone(), ctx.batch_size)?;
        ctx.run_blocking(reader).await
    }
}

/// Reads the records of one open file (a local file, or an object downloaded to a temporary
/// file) batch by batch; `path` names it in messages and a `.gz` ending means gzip.
pub(crate) type RecordReader = Box<dyn FnMut() -> Result<Option<Produced>> + Send>;

/// See [`RecordReader`].
///
/// # Errors
/// When the file cannot be read as `format`.
pub(crate) fn open_reader(
    component: &str,
    file: File,
    path: &Path,
    format: &FileFormat,
    schema: &SchemaRef,
    cast_to: Option<SchemaRef>,
    batch_size: usize,
) -> Result<RecordReader> {
    match format {
        FileFormat::Parquet(_) => {
            let mut reader = ParquetShard::open(component, file, batch_size, cast_to)?;
            Ok(Box::new(move || reader.next()))
        }
        format => {
            let decoder: Arc<dyn ChunkDecoder> = match format {
                FileFormat::Json(_) => Arc::new(JsonDecoder::new(schema.clone())),
                FileFormat::Csv(o) => Arc::new(CsvDecoder::new(schema.clone(), o)),
                FileFormat::Parquet(_) => unreachable!(),
            };
            let header = matches!(format, FileFormat::Csv(o) if o.header);
            let mut reader = TextShard {
                component: component.to_string(),
                path: path.to_path_buf(),
                input: text_input(file, path),
                decoder,
                line: 0,
                skip_header: header,
                splitter: match format {
                    FileFormat::Csv(o) => Some(RecordSplitter::new(o.delimiter as u8)),
                    _ => None,
                },
                batch_size,
                done: false,
            };
            Ok(Box::new(move || reader.next()))
        }
    }
}

/// Reads one NDJSON or CSV file in chunks of records and decodes each chunk.
struct TextShard {
    component: String,
    path: PathBuf,
    input: Box<dyn BufRead + Send>,
    decoder: Arc<dyn ChunkDecoder>,
    line: u64,
    skip_header: bool,
    splitter: Option<RecordSplitter>,
    batch_size: usize,
    done: bool,
}

impl TextShard {
    fn next(&mut self) -> Result<Option<Produced>> {
        if self.done {
            return Ok(None);
        }
        let mut chunk = LineChunk::new();
        let mut oversized = Vec::new();
        let mut first = None;
        while chunk.len() < self.batch_size && chunk.buf.len() < DEFAULT_MAX_CHUNK_BYTES {
            let record_start = chunk.buf.len();
            let record_line = self.line + 1;
            // A CSV record may span lines inside quotes; read until it is complete.
            let mut cut = false;
            loop {
                let before = chunk.buf.len();
                let room = MAX_RECORD_BYTES.saturating_sub(before - record_start);
                let (n, line_cut) = read_line_capped(self.input.as_mut(), &mut chunk.buf, room)
                    .map_err(|e| Error::io("cannot read", &self.path, e))?;
                if n == 0 {
                    self.done = true;
                    break;
                }
                if line_cut {
                    cut = true;
                    self.line += 1;
                    break;
                }
                self.line += 1;
                let complete = match &mut self.splitter {
                    Some(s) => s.line_ends_record(&chunk.buf[before..]),
                    None => true,
                };
                if complete {
                    break;
                }
            }
            let record = &chunk.buf[record_start..];
            if cut {
                first.get_or_insert(record_line);
                oversized.push(BadRecord {
                    position: Some(record_line),
                    stage: Stage::Decode,
                    error: format!(
                        "record longer than {} MiB; skipped to the next line (raw holds its first {OVERSIZED_RAW_BYTES} bytes)",
                        MAX_RECORD_BYTES >> 20
                    ),
                    raw: record[..record.len().min(OVERSIZED_RAW_BYTES)].to_vec(),
                    key: None,
                });
                chunk.buf.truncate(record_start);
                if let Some(s) = &mut self.splitter {
                    *s = RecordSplitter::new(s.delimiter());
                }
            } else if record.iter().all(u8::is_ascii_whitespace) {
                chunk.buf.truncate(record_start);
            } else if self.skip_header {
                self.skip_header = false;
                chunk.buf.truncate(record_start);
            } else {
                if chunk.buf.last() != Some(&b'\n') {
                    chunk.buf.push(b'\n');
                }
                chunk.starts.push(chunk.buf.len());
                chunk.positions.push(record_line);
                first.get_or_insert(record_line);
            }
            if self.done {
                break;
            }
        }
        let Some(first) = first else { return Ok(None) };
        let mut decoded = decode_chunk(self.decoder.as_ref(), &chunk).map_err(|e| Error::arrow(&self.component, e))?;
        let last = chunk
            .positions
            .iter()
            .chain(oversized.iter().filter_map(|b| b.position.as_ref()))
            .max()
            .copied()
            .unwrap_or(first);
        decoded.bad.extend(oversized);
        decoded.bad.sort_by_key(|b| b.position);
        Ok(Some(Produced {
            data: decoded.batch,
            positions: decoded.positions,
            bad: decoded.bad,
            first,
            last,
            raw_bytes: chunk.buf.len(),
        }))
    }
}

/// Appends one line (with its `\n`) to `buf`, keeping at most `max` bytes of it and consuming the
/// rest, so one huge line cannot take memory without limit. Returns the bytes consumed and whether
/// the line was cut.
fn read_line_capped(input: &mut dyn BufRead, buf: &mut Vec<u8>, max: usize) -> std::io::Result<(usize, bool)> {
    let (mut consumed, mut kept, mut cut) = (0, 0, false);
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            return Ok((consumed, cut));
        }
        let (take, ends) = match memchr::memchr(b'\n', available) {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let keep = take.min(max.saturating_sub(kept));
        buf.extend_from_slice(&available[..keep]);
        kept += keep;
        cut |= keep < take;
        input.consume(take);
        consumed += take;
        if ends {
            return Ok((consumed, cut));
        }
    }
}

/// Reads one Parquet file batch by batch; positions are 1-based record numbers.
struct ParquetShard {
    component: String,
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    cast_to: Option<SchemaRef>,
    next_record: u64,
}

impl ParquetShard {
    fn open(component: &str, f: File, batch_size: usize, cast_to: Option<SchemaRef>) -> Result<Self> {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.with_batch_size(batch_size).build())
            .map_err(|e| Error::parquet(component, e))?;
        Ok(ParquetShard { component: component.to_string(), reader, cast_to, next_record: 1 })
    }

    fn next(&mut self) -> Result<Option<Produced>> {
        let Some(batch) = self.reader.next() else { return Ok(None) };
        let batch = batch.map_err(|e| Error::arrow(&self.component, e))?;
        let n = batch.num_rows();
        let first = self.next_record;
        self.next_record += n as u64;
        let raw_bytes = batch.get_array_memory_size();
        let Some(target) = &self.cast_to else {
            return Ok(Some(Produced {
                data: batch,
                positions: (first..first + n as u64).collect(),
                bad: vec![],
                first,
                last: first + n as u64 - 1,
                raw_bytes,
            }));
        };
        let isolated = crate::format::isolate(n, |r| cast_batch(&batch.slice(r.start, r.len()), target));
        let mut positions = Vec::with_capacity(n);
        for r in &isolated.good {
            positions.extend(r.clone().map(|i| first + i as u64));
        }
        let bad = isolated
            .bad
            .into_iter()
            .map(|(i, error)| BadRecord {
                position: Some(first + i as u64),
                stage: Stage::Convert,
                error,
                raw: crate::transform::row_as_json(&batch, i),
                key: None,
            })
            .collect();
        let data =
            arrow::compute::concat_batches(target, &isolated.batches).map_err(|e| Error::arrow(&self.component, e))?;
        Ok(Some(Produced { data, positions, bad, first, last: first + n as u64 - 1, raw_bytes }))
    }
}

/// Selects `target`'s columns by name and casts them to its types; a failing cast is an error.
fn cast_batch(
    batch: &arrow::record_batch::RecordBatch,
    target: &SchemaRef,
) -> Result<arrow::record_batch::RecordBatch, String> {
    let mut columns = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        let col = batch
            .column_by_name(field.name())
            .ok_or_else(|| format!("column `{}` is not in the Parquet file", field.name()))?;
        let opts = arrow::compute::CastOptions { safe: false, ..Default::default() };
        let cast = arrow::compute::cast_with_options(col, field.data_type(), &opts)
            .map_err(|e| format!("column `{}`: {e}", field.name()))?;
        if !field.is_nullable() && cast.null_count() > 0 {
            return Err(format!("column `{}` is `not null` but the record has no value", field.name()));
        }
        columns.push(cast);
    }
    arrow::record_batch::RecordBatch::try_new(target.clone(), columns).map_err(|e| e.to_string())
}
