//! The pipeline TOML model, loading with `${VAR}` interpolation, and errors that point at file:line.

pub mod env;
pub mod types;

use std::fmt;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::Deserialize;

pub use types::{ByteSize, ColumnType, HumanDuration};

use crate::sink::{blackhole::BlackholeSinkConfig, file::FileSinkConfig, stdout::StdoutSinkConfig};
use crate::source::{file::FileSourceConfig, generator::GeneratorConfig};
use crate::transform::sql::SqlTransformConfig;

/// Default for [`PipelineSettings::memory_budget`]: 512 MiB.
pub const DEFAULT_MEMORY_BUDGET: ByteSize = ByteSize(512 << 20);
/// Default for [`PipelineSettings::batch_size`].
pub const DEFAULT_BATCH_SIZE: usize = 8192;
/// Default for [`PipelineSettings::channel_capacity`].
pub const DEFAULT_CHANNEL_CAPACITY: usize = 4;
/// Default for [`PipelineSettings::shard_parallelism`].
pub const DEFAULT_SHARD_PARALLELISM: usize = 2;

/// A whole pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Pipeline-wide settings.
    pub pipeline: PipelineSettings,
    /// Where records come from, by component id.
    #[serde(default)]
    pub sources: IndexMap<String, SourceConfig>,
    /// SQL and other transforms, by component id.
    #[serde(default)]
    pub transforms: IndexMap<String, TransformConfig>,
    /// Where records go, by component id.
    #[serde(default)]
    pub sinks: IndexMap<String, SinkConfig>,
    /// Receives every record that cannot be decoded, converted, transformed or written, as NDJSON.
    /// Without it the first bad record stops the pipeline.
    pub dead_letter: Option<SinkConfig>,
}

/// The `[pipeline]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Name used in logs and as the `pipeline` label of every metric.
    pub name: String,
    /// Upper bound on the bytes of record batches in flight between components. Sources wait for
    /// room when it is reached, so a slow sink slows the sources down instead of memory growing.
    #[serde(default = "default_memory_budget")]
    pub memory_budget: ByteSize,
    /// Records per batch read from a source.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Batches that may wait between two components.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// Shards (files, partitions, ranges) each source reads at the same time.
    #[serde(default = "default_shard_parallelism")]
    pub shard_parallelism: usize,
}

fn default_memory_budget() -> ByteSize {
    DEFAULT_MEMORY_BUDGET
}
fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
fn default_channel_capacity() -> usize {
    DEFAULT_CHANNEL_CAPACITY
}
fn default_shard_parallelism() -> usize {
    DEFAULT_SHARD_PARALLELISM
}

/// A `[sources.ID]` table, chosen by its `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// Deterministic synthetic events.
    Generator(GeneratorConfig),
    /// NDJSON, CSV or Parquet files.
    File(FileSourceConfig),
    /// Partitions of Kafka topics.
    Kafka(Box<crate::source::kafka::KafkaSourceConfig>),
    /// Objects in an S3-compatible bucket.
    S3(Box<crate::source::s3::S3SourceConfig>),
    /// A PostgreSQL table or query (binary COPY; sharded or incremental).
    Postgres(Box<crate::source::postgres::PostgresSourceConfig>),
}

/// A `[transforms.ID]` table, chosen by its `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TransformConfig {
    /// DataFusion SQL over each batch.
    Sql(SqlTransformConfig),
}

impl TransformConfig {
    /// The upstream component ids.
    pub fn inputs(&self) -> &[String] {
        match self {
            TransformConfig::Sql(c) => &c.inputs,
        }
    }
}

/// A `[sinks.ID]` (or `[dead_letter]`) table, chosen by its `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkConfig {
    /// Parquet, NDJSON or CSV files in a directory.
    File(FileSinkConfig),
    /// Prints records to standard output.
    Stdout(StdoutSinkConfig),
    /// Counts and discards records.
    Blackhole(BlackholeSinkConfig),
    /// Messages to a Kafka topic.
    Kafka(Box<crate::sink::kafka::KafkaSinkConfig>),
    /// Objects in an S3-compatible bucket.
    S3(Box<crate::sink::s3::S3SinkConfig>),
    /// Rows of a PostgreSQL table (binary COPY; insert or upsert).
    Postgres(Box<crate::sink::postgres::PostgresSinkConfig>),
}

impl SinkConfig {
    /// The upstream component ids.
    pub fn inputs(&self) -> &[String] {
        match self {
            SinkConfig::File(c) => &c.inputs,
            SinkConfig::Stdout(c) => &c.inputs,
            SinkConfig::Blackhole(c) => &c.inputs,
            SinkConfig::Kafka(c) => &c.inputs,
            SinkConfig::S3(c) => &c.inputs,
            SinkConfig::Postgres(c) => &c.inputs,
        }
    }

    /// The `type` as written.
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::Blackhole(_) => "blackhole",
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::S3(_) => "s3",
            SinkConfig::Postgres(_) => "postgres",
        }
    }
}

/// One problem in a pipeline file, with where it is and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `sinks.lake.inputs`.
    pub key: String,
    pub message: String,
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n    help: {help}")?;
        }
        Ok(())
    }
}

/// A pipeline file that cannot run, with every problem found.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.diagnostics.len();
        writeln!(f, "invalid pipeline ({n} problem{}):", if n == 1 { "" } else { "s" })?;
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  {d}")?;
        }
        Ok(())
    }
}

impl From<Diagnostic> for ConfigError {
    fn from(d: Diagnostic) -> Self {
        ConfigError { diagnostics: vec![d] }
    }
}

/// A parsed pipeline file, with what is needed to point back into its text.
#[derive(Debug)]
pub struct LoadedPipeline {
    pub path: PathBuf,
    pub file: PipelineFile,
    locator: Locator,
}

impl LoadedPipeline {
    /// A diagnostic for the key at `path` (e.g. `["sinks", "lake", "inputs"]`), located at the
    /// deepest part of the path that exists in the file.
    pub fn diagnostic(&self, path: &[&str], message: impl Into<String>, help: Option<String>) -> Diagnostic {
        let (line, column) = self.locator.locate(path);
        Diagnostic { file: self.locator.file.clone(), line, column, key: path.join("."), message: message.into(), help }
    }
}

/// Reads, interpolates and parses a pipeline file.
///
/// # Errors
/// Unreadable file, TOML syntax errors, unknown keys, wrong value types and missing environment
/// variables, each located at file:line:column.
pub fn load(path: &Path) -> Result<LoadedPipeline, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| Diagnostic {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!("cannot read pipeline file: {e}"),
        help: Some("check the path; pipelines are TOML files such as pipelines/quickstart.toml".into()),
    })?;
    load_str(path, &text, |k| std::env::var(k).ok())
}

/// Parses a pipeline from text; `path` is used for messages only.
///
/// # Errors
/// As [`load`].
pub fn load_str(path: &Path, text: &str, env: impl Fn(&str) -> Option<String>) -> Result<LoadedPipeline, ConfigError> {
    let file_label = path.display().to_string();
    let locator = Locator::new(&file_label, text);
    let interpolated = env::interpolate(text, env).map_err(|missing| ConfigError {
        diagnostics: missing
            .into_iter()
            .map(|m| {
                let (line, column) = locator.line_col(m.offset);
                Diagnostic {
                    file: file_label.clone(),
                    line,
                    column,
                    key: locator.key_at(m.offset),
                    message: format!("environment variable `{}` is not set", m.name),
                    help: Some(format!("export {0}=..., or give a default with ${{{0}:-value}}", m.name)),
                }
            })
            .collect(),
    })?;
    let file: PipelineFile = toml::from_str(&interpolated).map_err(|e| {
        let table = locator.key_at(e.span().map(|s| s.start).unwrap_or(0));
        let e = precise_component_error(&interpolated, &table).filter(|p| p.span().is_some()).unwrap_or(e);
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        let (line, column) = locator.line_col(offset);
        let mut message = e.message().trim().to_string();
        if text.contains("${") {
            // A value may have come from the environment and be a secret: never echo quoted values.
            message = redact_quoted(&message);
            if let Some(rest) = message.strip_prefix("unknown variant `") {
                if let Some(end) = rest.find('`') {
                    message = format!("unknown variant `***`{}", &rest[end + 1..]);
                }
            }
        }
        Diagnostic {
            file: file_label.clone(),
            line,
            column,
            key: locator.key_at(offset),
            help: help_for_serde_message(&message),
            message,
        }
    })?;
    Ok(LoadedPipeline { path: path.to_path_buf(), file, locator })
}

fn help_for_serde_message(message: &str) -> Option<String> {
    if message.contains("unknown field") {
        Some("remove or rename the key; the expected keys are listed above and documented in README.md".into())
    } else if message.contains("unknown variant") {
        Some("`type` must be one of the listed component types".into())
    } else if message.contains("missing field") {
        Some("add the key; see the configuration reference in README.md".into())
    } else if message.contains("invalid type") {
        Some("check the value's type: strings are quoted, lists use [ ], tables use { } or [section]".into())
    } else {
        None
    }
}

/// Replaces the contents of every `"..."` / `` `...` `` in `message` with `***`.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => {
                out.push_str("***");
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '"' {
                    open = Some(c);
                }
            }
        }
    }
    out
}

/// Maps byte offsets and key paths back to line and column in the original text.
#[derive(Debug)]
struct Locator {
    file: String,
    text: String,
    doc: Option<toml_edit::Document<String>>,
}

/// The text as a toml_edit document (for key paths and spans), or None when it is not TOML.
/// toml_edit 0.23 panics ("all items have spans") on some malformed files that the fuzzer found
/// (fuzz/regressions/pipeline_toml/), so it only sees text that `toml` (another parser) accepts,
/// and a panic is caught all the same: a broken file must end in a syntax error, never a crash.
fn locator_document(text: &str) -> Option<toml_edit::Document<String>> {
    toml::from_str::<toml::Table>(text).ok()?;
    std::panic::catch_unwind(|| toml_edit::Document::parse(text.to_string()).ok()).ok().flatten()
}

impl Locator {
    fn new(file: &str, text: &str) -> Self {
        Locator { file: file.to_string(), text: text.to_string(), doc: locator_document(text) }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text.as_bytes()[..offset];
        let line = memchr::memchr_iter(b'\n', before).count() + 1;
        let line_start = memchr::memrchr(b'\n', before).map(|p| p + 1).unwrap_or(0);
        (line, offset - line_start + 1)
    }

    /// Line and column of the deepest existing key on `path`.
    fn locate(&self, path: &[&str]) -> (usize, usize) {
        let Some(doc) = &self.doc else { return (1, 1) };
        let mut best = None;
        let mut item: &toml_edit::Item = doc.as_item();
        for segment in path {
            let Some(table) = item.as_table_like() else { break };
            let Some((key, value)) = table.get_key_value(segment) else { break };
            if let Some(span) = key.span().or_else(|| value.span()) {
                best = Some(span.start);
            } else if let Some(t) = value.as_table() {
                best = t.span().map(|s| s.start).or(best);
            }
            item = value;
        }
        best.map(|o| self.line_col(o)).unwrap_or((1, 1))
    }

    /// The dotted key path at `offset`: the table header above it, plus the key on its line.
    fn key_at(&self, offset: usize) -> String {
        let (line, _) = self.line_col(offset);
        let lines: Vec<&str> = self.text.lines().collect();
        let mut table = String::new();
        for l in lines.iter().take(line.saturating_sub(1)).rev() {
            if let Some(h) = header_of(l) {
                table = h;
                break;
            }
        }
        let here = lines.get(line.saturating_sub(1)).copied().unwrap_or("");
        if let Some(h) = header_of(here) {
            return h;
        }
        let key = here.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_string()).unwrap_or_default();
        match (table.is_empty(), key.is_empty()) {
            (true, _) => key,
            (false, true) => table,
            (false, false) => format!("{table}.{key}"),
        }
    }
}

/// `[a.b]` or `[[a.b]]` → `a.b`.
fn header_of(line: &str) -> Option<String> {
    let t = line.trim();
    let inner = t.strip_prefix('[')?.trim_start_matches('[');
    let end = inner.find(']')?;
    Some(inner[..end].split('.').map(|p| p.trim().trim_matches('"')).collect::<Vec<_>>().join("."))
}

/// Serde errors inside a `type`-tagged component table are reported by the TOML parser at the
/// table's header (the enum buffers the table). Deserialize that one table again as its concrete
/// config type, from a copy of the text where everything else is blanked (so offsets and line
/// numbers stay), to find the exact key.
fn precise_component_error(text: &str, table: &str) -> Option<toml::de::Error> {
    let mut parts = table.splitn(3, '.');
    let (section, id) = match (parts.next()?, parts.next()) {
        ("dead_letter", _) => ("dead_letter", None),
        (s @ ("sources" | "transforms" | "sinks"), Some(id)) => (s, Some(id)),
        _ => return None,
    };
    let own = match id {
        Some(id) => format!("{section}.{id}"),
        None => section.to_string(),
    };
    let mut masked = String::with_capacity(text.len());
    let mut inside = false;
    let mut in_own_header = false;
    let mut ty = None;
    for line in text.split_inclusive('\n') {
        if let Some(h) = header_of(line) {
            inside = h == own || h.starts_with(&format!("{own}."));
            in_own_header = h == own;
        }
        let key = line.split_once('=').map(|(k, _)| k.trim());
        if inside && in_own_header && key == Some("type") {
            ty = line.split_once('=').map(|(_, v)| v.trim().trim_matches('"').to_string());
            masked.extend(line.chars().map(|c| if c == '\n' { '\n' } else { ' ' }));
        } else if inside {
            masked.push_str(line);
        } else {
            masked.extend(line.chars().map(|c| if c == '\n' { '\n' } else { ' ' }));
        }
    }
    let ty = ty?;
    fn check<T: serde::de::DeserializeOwned>(masked: &str, section: &str, id: Option<&str>) -> Option<toml::de::Error> {
        let _ = section;
        match id {
            Some(_) => toml::from_str::<IndexMap<String, IndexMap<String, T>>>(masked).err(),
            None => toml::from_str::<IndexMap<String, T>>(masked).err(),
        }
    }
    use crate::sink::{blackhole::BlackholeSinkConfig, file::FileSinkConfig, stdout::StdoutSinkConfig};
    use crate::source::{file::FileSourceConfig, generator::GeneratorConfig};
    use crate::transform::sql::SqlTransformConfig;
    match (section, ty.as_str()) {
        ("sources", "generator") => check::<GeneratorConfig>(&masked, section, id),
        ("sources", "file") => check::<FileSourceConfig>(&masked, section, id),
        ("sources", "kafka") => check::<crate::source::kafka::KafkaSourceConfig>(&masked, section, id),
        ("sinks" | "dead_letter", "kafka") => check::<crate::sink::kafka::KafkaSinkConfig>(&masked, section, id),
        ("sources", "s3") => check::<crate::source::s3::S3SourceConfig>(&masked, section, id),
        ("sinks" | "dead_letter", "s3") => check::<crate::sink::s3::S3SinkConfig>(&masked, section, id),
        ("transforms", "sql") => check::<SqlTransformConfig>(&masked, section, id),
        ("sinks" | "dead_letter", "file") => check::<FileSinkConfig>(&masked, section, id),
        ("sinks" | "dead_letter", "stdout") => check::<StdoutSinkConfig>(&masked, section, id),
        ("sinks" | "dead_letter", "blackhole") => check::<BlackholeSinkConfig>(&masked, section, id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[pipeline]
name = "t"

[sources.gen]
type = "generator"
shape = "orders"
count = 10

[sinks.out]
type = "blackhole"
inputs = ["gen"]
"#;

    fn load_text(text: &str) -> Result<LoadedPipeline, ConfigError> {
        load_str(Path::new("p.toml"), text, |k| (k == "SET").then(|| "hunter2-secret".to_string()))
    }

    #[test]
    fn loads_a_valid_pipeline() {
        let p = load_text(GOOD).unwrap();
        assert_eq!(p.file.pipeline.name, "t");
        assert_eq!(p.file.pipeline.memory_budget, DEFAULT_MEMORY_BUDGET);
        assert!(matches!(p.file.sources["gen"], SourceConfig::Generator(_)));
        assert_eq!(p.file.sinks["out"].inputs(), ["gen".to_string()]);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = GOOD.replace("count = 10", "count = 10\ncolor = \"blue\"");
        let err = load_text(&text).unwrap_err();
        let d = &err.diagnostics[0];
        assert_eq!(d.file, "p.toml");
        assert!(d.message.contains("unknown field `color`"), "{d}");
        assert!(d.key.starts_with("sources.gen"), "{d}");
        assert!((6..=9).contains(&d.line), "{d}");
    }

    #[test]
    fn wrong_value_type_is_located() {
        let text = GOOD.replace("count = 10", "count = \"ten\"");
        let d = &load_text(&text).unwrap_err().diagnostics[0];
        assert!(d.message.contains("invalid type") || d.message.contains("invalid value"), "{d}");
        assert_eq!(d.line, 8, "{d}");
    }

    #[test]
    fn missing_env_var_is_located() {
        let text = GOOD.replace("name = \"t\"", "name = \"${PIPELINE_NAME_NOT_SET}\"");
        let d = &load_text(&text).unwrap_err().diagnostics[0];
        assert_eq!((d.line, d.key.as_str()), (3, "pipeline.name"), "{d}");
        assert!(d.message.contains("PIPELINE_NAME_NOT_SET"));
    }

    #[test]
    fn secrets_from_env_never_appear_in_errors() {
        let text = GOOD.replace("count = 10", "count = \"${SET}\"");
        let err = load_text(&text).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("p.toml:8"), "{err}");
    }

    #[test]
    fn unknown_component_type_lists_the_known_ones() {
        let text = GOOD.replace("type = \"blackhole\"", "type = \"blackhold\"");
        let d = &load_text(&text).unwrap_err().diagnostics[0];
        assert!(d.message.contains("unknown variant `blackhold`"), "{d}");
        assert!(d.message.contains("blackhole"), "{d}");
    }

    #[test]
    fn diagnostic_points_at_a_key() {
        let p = load_text(GOOD).unwrap();
        let d = p.diagnostic(&["sinks", "out", "inputs"], "x", None);
        assert_eq!((d.line, d.column), (12, 1));
    }
}
