//! Turns a parsed pipeline file into components, checking everything that can be checked before
//! anything runs: the graph of `inputs`, each component's settings, schemas, and SQL plans.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;

use super::{BuiltSink, BuiltSource, BuiltTransform, Pipeline};
use crate::config::types::sql_type_name;
use crate::config::{ConfigError, Diagnostic, LoadedPipeline, SinkConfig, SourceConfig, TransformConfig};
use crate::observe::ComponentMetrics;
use crate::sink::blackhole::BlackholeSink;
use crate::sink::file::FileSink;
use crate::sink::stdout::StdoutSink;
use crate::sink::writer::OutputFormat;
use crate::sink::Sink;
use crate::source::file::FileSource;
use crate::source::generator::GeneratorSource;
use crate::source::Source;
use crate::transform::sql::SqlTransform;
use crate::transform::Transform;

/// Builds every component of `loaded`.
///
/// # Errors
/// Every problem found, each located at its file, line and key.
pub async fn build(loaded: &LoadedPipeline) -> Result<Pipeline, ConfigError> {
    let f = &loaded.file;
    let mut diags: Vec<Diagnostic> = Vec::new();
    let settings = &f.pipeline;
    if settings.batch_size == 0 {
        diags.push(loaded.diagnostic(&["pipeline", "batch_size"], "must be at least 1", None));
    }
    if settings.channel_capacity == 0 {
        diags.push(loaded.diagnostic(&["pipeline", "channel_capacity"], "must be at least 1", None));
    }
    if settings.shard_parallelism == 0 {
        diags.push(loaded.diagnostic(&["pipeline", "shard_parallelism"], "must be at least 1", None));
    }
    if f.sources.is_empty() {
        diags.push(loaded.diagnostic(
            &["sources"],
            "the pipeline has no source",
            Some("add a [sources.NAME] table with a `type`".into()),
        ));
    }
    if f.sinks.is_empty() {
        diags.push(loaded.diagnostic(
            &["sinks"],
            "the pipeline has no sink",
            Some("add a [sinks.NAME] table with a `type` and `inputs`".into()),
        ));
    }

    // Component ids: unique across sections, usable as SQL table names and in file names.
    let mut section_of: HashMap<&str, &str> = HashMap::new();
    for (section, ids) in [
        ("sources", f.sources.keys().collect::<Vec<_>>()),
        ("transforms", f.transforms.keys().collect()),
        ("sinks", f.sinks.keys().collect()),
    ] {
        for id in ids {
            if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') || id.is_empty() {
                diags.push(loaded.diagnostic(
                    &[section, id],
                    format!("component id `{id}` may only hold letters, digits, `_` and `-`"),
                    None,
                ));
            }
            if let Some(other) = section_of.insert(id, section) {
                diags.push(loaded.diagnostic(
                    &[section, id],
                    format!("`{id}` is already the id of a component in [{other}]"),
                    Some("give each component its own id".into()),
                ));
            }
        }
    }

    // The graph: inputs must name sources or transforms; no cycles; nothing left unread.
    let upstreams: Vec<(&str, &str, &[String])> = f
        .transforms
        .iter()
        .map(|(id, t)| ("transforms", id.as_str(), t.inputs()))
        .chain(f.sinks.iter().map(|(id, s)| ("sinks", id.as_str(), s.inputs())))
        .collect();
    let mut graph_ok = true;
    for (section, id, inputs) in &upstreams {
        let mut seen = HashSet::new();
        for input in inputs.iter() {
            if !seen.insert(input) {
                diags.push(loaded.diagnostic(
                    &[section, id, "inputs"],
                    format!("`{input}` is listed twice; every record would be processed twice"),
                    None,
                ));
            }
        }
        if inputs.is_empty() {
            graph_ok = false;
            diags.push(loaded.diagnostic(
                &[section, id],
                "has no `inputs`",
                Some(format!("add inputs = [\"...\"] naming a source or transform; known: {}", known(f))),
            ));
        }
        for input in inputs.iter() {
            let ok = f.sources.contains_key(input) || (f.transforms.contains_key(input) && input != id);
            if !ok {
                graph_ok = false;
                let why = if input == id {
                    format!("`{id}` names itself as input")
                } else if f.sinks.contains_key(input) {
                    format!("`{input}` is a sink; sinks cannot feed other components")
                } else {
                    format!("unknown input `{input}`")
                };
                diags.push(loaded.diagnostic(
                    &[section, id, "inputs"],
                    why,
                    Some(format!("inputs name sources or transforms: {}", known(f))),
                ));
            }
        }
    }
    let order = if graph_ok { topo_order(loaded, &mut diags) } else { None };
    if let Some(order) = &order {
        exactly_once_paths(loaded, order, &mut diags);
    }
    let consumed: HashSet<&str> = upstreams.iter().flat_map(|(_, _, i)| i.iter().map(String::as_str)).collect();
    for (section, ids) in
        [("sources", f.sources.keys().collect::<Vec<_>>()), ("transforms", f.transforms.keys().collect())]
    {
        for id in ids {
            if !consumed.contains(id.as_str()) {
                diags.push(loaded.diagnostic(
                    &[section, id],
                    format!("nothing reads the output of `{id}`"),
                    Some(format!("name `{id}` in the `inputs` of a transform or sink, or remove it")),
                ));
            }
        }
    }

    // Sources.
    let mut schemas: HashMap<String, SchemaRef> = HashMap::new();
    let mut sources = Vec::new();
    for (id, cfg) in &f.sources {
        let built: Result<Arc<dyn Source>, (&str, String)> = match cfg {
            SourceConfig::Generator(c) => GeneratorSource::new(id, c.clone()).map(|s| Arc::new(s) as Arc<dyn Source>),
            SourceConfig::File(c) => FileSource::new(id, c).map(|s| Arc::new(s) as Arc<dyn Source>),
            SourceConfig::Kafka(c) => {
                crate::source::kafka::KafkaSource::new(id, &f.pipeline.name, c).map(|s| Arc::new(s) as Arc<dyn Source>)
            }
            SourceConfig::S3(c) => {
                crate::source::s3::S3Source::new(id, &f.pipeline.name, c).await.map(|s| Arc::new(s) as Arc<dyn Source>)
            }
            SourceConfig::Postgres(c) => {
                crate::source::postgres::PostgresSource::new(id, &f.pipeline.name, c, f.pipeline.shard_parallelism)
                    .await
                    .map(|s| Arc::new(s) as Arc<dyn Source>)
            }
        };
        match built {
            Ok(source) => {
                schemas.insert(id.clone(), source.schema());
                sources.push(BuiltSource {
                    id: id.clone(),
                    source,
                    outputs: Vec::new(),
                    metrics: ComponentMetrics::new(id),
                });
            }
            Err((key, msg)) => diags.push(loaded.diagnostic(&["sources", id, key], msg, None)),
        }
    }

    // Transforms, upstream first, each planned against its input's schema.
    let mut transforms = Vec::new();
    for id in order.unwrap_or_default() {
        let cfg = &f.transforms[&id];
        let TransformConfig::Sql(c) = cfg;
        if c.inputs.len() != 1 {
            diags.push(loaded.diagnostic(
                &["transforms", &id, "inputs"],
                format!("a sql transform reads exactly one input, not {}", c.inputs.len()),
                Some("chain transforms, or give each input its own transform".into()),
            ));
            continue;
        }
        let Some(schema) = schemas.get(&c.inputs[0]).cloned() else { continue };
        match SqlTransform::new(&id, &c.inputs[0], schema, &c.query).await {
            Ok(t) => {
                schemas.insert(id.clone(), t.output_schema());
                transforms.push(BuiltTransform {
                    id: id.clone(),
                    transform: Box::new(t) as Box<dyn Transform>,
                    outputs: Vec::new(),
                    metrics: ComponentMetrics::new(&id),
                });
            }
            Err(e) => diags.push(loaded.diagnostic(
                &["transforms", &id, "query"],
                format!("the query does not plan against `{}`: {e}", c.inputs[0]),
                Some(format!("`{}` has columns: {}", c.inputs[0], describe(schemas.get(&c.inputs[0])))),
            )),
        }
    }

    // Sinks: every input must have one schema.
    let mut sinks = Vec::new();
    for (id, cfg) in &f.sinks {
        let inputs = cfg.inputs();
        let input_schemas: Vec<&SchemaRef> = inputs.iter().filter_map(|i| schemas.get(i)).collect();
        if input_schemas.len() != inputs.len() || inputs.is_empty() {
            continue; // Already reported upstream.
        }
        let schema = input_schemas[0].clone();
        if let Some((i, other)) = inputs.iter().zip(&input_schemas).find(|(_, s)| s.fields() != schema.fields()) {
            diags.push(loaded.diagnostic(
                &["sinks", id.as_str(), "inputs"],
                format!(
                    "inputs have different schemas: `{}` has {}, `{i}` has {}",
                    inputs[0],
                    describe(Some(&schema)),
                    describe(Some(other))
                ),
                Some("give the sink one input, or make the inputs' columns match with a sql transform".into()),
            ));
            continue;
        }
        let metrics = ComponentMetrics::new(id);
        match build_sink(id, &f.pipeline.name, cfg, &schema, metrics.clone()) {
            Ok(sink) => sinks.push(BuiltSink { id: id.clone(), sink, metrics, inputs: inputs.to_vec() }),
            Err((key, msg)) => diags.push(loaded.diagnostic(&["sinks", id, key], msg, None)),
        }
    }

    // Two file sinks writing one directory would overwrite each other's files.
    let mut dirs: HashMap<String, String> = HashMap::new();
    let file_sinks = f
        .sinks
        .iter()
        .map(|(id, c)| (vec!["sinks", id.as_str()], c))
        .chain(f.dead_letter.iter().map(|c| (vec!["dead_letter"], c)));
    for (path, cfg) in file_sinks {
        if let SinkConfig::File(c) = cfg {
            let dir = std::path::Path::new(&c.path).components().collect::<std::path::PathBuf>().display().to_string();
            let label = path.join(".");
            if let Some(other) = dirs.insert(dir.clone(), label.clone()) {
                let mut key = path.clone();
                key.push("path");
                diags.push(loaded.diagnostic(
                    &key,
                    format!("`{other}` already writes to `{dir}`"),
                    Some("give each file sink its own directory".into()),
                ));
            }
        }
    }

    // The dead-letter sink.
    let mut dead_letter = None;
    if let Some(cfg) = &f.dead_letter {
        let id = "dead_letter";
        let problem = if !cfg.inputs().is_empty() {
            Some((
                "inputs",
                "the dead-letter sink receives bad records from every component; remove `inputs`".to_string(),
            ))
        } else {
            match cfg {
                SinkConfig::File(c) if c.format.is_some_and(|f| f != OutputFormat::Json) => Some((
                    "format",
                    "dead letters are written as NDJSON: use format = \"json\" or leave it out".to_string(),
                )),
                SinkConfig::S3(c) if c.format.is_some_and(|f| f != OutputFormat::Json) => Some((
                    "format",
                    "dead letters are written as NDJSON: use format = \"json\" or leave it out".to_string(),
                )),
                SinkConfig::Blackhole(_) => {
                    Some(("type", "a blackhole would lose bad records; use a file or stdout sink".to_string()))
                }
                _ => None,
            }
        };
        if let Some((key, msg)) = problem {
            diags.push(loaded.diagnostic(&["dead_letter", key], msg, None));
        } else {
            let mut cfg = cfg.clone();
            match &mut cfg {
                SinkConfig::File(c) => c.format = Some(OutputFormat::Json),
                SinkConfig::S3(c) => c.format = Some(OutputFormat::Json),
                _ => {}
            }
            let metrics = ComponentMetrics::new(id);
            match build_sink(id, &f.pipeline.name, &cfg, &crate::dead_letter::schema(), metrics.clone()) {
                Ok(sink) => dead_letter = Some(BuiltSink { id: id.to_string(), sink, metrics, inputs: vec![] }),
                Err((key, msg)) => diags.push(loaded.diagnostic(&["dead_letter", key], msg, None)),
            }
        }
    }

    if !diags.is_empty() {
        return Err(ConfigError { diagnostics: diags });
    }

    // Wire outputs: each source / transform sends to the components that name it.
    for (section, id, inputs) in &upstreams {
        for input in inputs.iter() {
            let target = format!("{section}.{id}");
            if let Some(s) = sources.iter_mut().find(|s| &s.id == input) {
                s.outputs.push(target);
            } else if let Some(t) = transforms.iter_mut().find(|t| &t.id == input) {
                t.outputs.push(target);
            }
        }
    }
    Ok(Pipeline { settings: settings.clone(), sources, transforms, sinks, dead_letter, schemas })
}

fn build_sink(
    id: &str,
    pipeline: &str,
    cfg: &SinkConfig,
    schema: &SchemaRef,
    metrics: ComponentMetrics,
) -> Result<Box<dyn Sink>, (&'static str, String)> {
    Ok(match cfg {
        SinkConfig::File(c) => Box::new(FileSink::new(id, c, schema, metrics)?),
        SinkConfig::Stdout(c) => Box::new(StdoutSink::new(id, c)),
        SinkConfig::Blackhole(_) => Box::new(BlackholeSink),
        SinkConfig::Kafka(c) => Box::new(crate::sink::kafka::KafkaSink::new(id, c, schema, metrics)?),
        SinkConfig::S3(c) => Box::new(crate::sink::s3::S3Sink::new(id, c, schema, metrics)?),
        SinkConfig::Postgres(c) => {
            Box::new(crate::sink::postgres::PostgresSink::new(id, pipeline, c, schema, metrics)?)
        }
    })
}

fn known(f: &crate::config::PipelineFile) -> String {
    let ids: Vec<&str> = f.sources.keys().chain(f.transforms.keys()).map(String::as_str).collect();
    if ids.is_empty() {
        "(none)".into()
    } else {
        ids.join(", ")
    }
}

/// `a bigint, b varchar` for messages.
pub fn describe(schema: Option<&SchemaRef>) -> String {
    match schema {
        Some(s) => s
            .fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), sql_type_name(f.data_type())))
            .collect::<Vec<_>>()
            .join(", "),
        None => "(unknown)".into(),
    }
}

/// An `exactly_once` sink skips, on a replay, the rows of each source shard before the position
/// it recorded, which holds only while that shard's rows reach it in order: by one path. Two
/// paths from one source (two transforms of it, both inputs of the sink) interleave their
/// batches, and a replay could skip rows that were never written.
fn exactly_once_paths(loaded: &LoadedPipeline, order: &[String], diags: &mut Vec<Diagnostic>) {
    let f = &loaded.file;
    // For each source and transform: the sources it carries, and by how many paths.
    let mut paths: HashMap<&str, HashMap<&str, usize>> =
        f.sources.keys().map(|id| (id.as_str(), HashMap::from([(id.as_str(), 1)]))).collect();
    fn carried<'a>(inputs: &[String], paths: &HashMap<&str, HashMap<&'a str, usize>>) -> HashMap<&'a str, usize> {
        let mut sum: HashMap<&str, usize> = HashMap::new();
        for input in inputs {
            for (src, n) in paths.get(input.as_str()).into_iter().flatten() {
                *sum.entry(*src).or_default() += n;
            }
        }
        sum
    }
    for id in order {
        let sum = carried(f.transforms[id].inputs(), &paths);
        paths.insert(id.as_str(), sum);
    }
    for (id, sink) in &f.sinks {
        let exactly_once = match sink {
            SinkConfig::File(c) => c.exactly_once,
            SinkConfig::S3(c) => c.exactly_once,
            SinkConfig::Postgres(c) => c.exactly_once,
            _ => false,
        };
        if !exactly_once {
            continue;
        }
        let sources = carried(sink.inputs(), &paths);
        // A consumer group moves partitions between runs with records in flight (at-least-once):
        // the old owner's open files and the new owner's replay can both hold them.
        let mut grouped: Vec<&str> = sources
            .keys()
            .copied()
            .filter(|src| {
                matches!(&f.sources[*src], SourceConfig::Kafka(c) if c.assignment == crate::source::kafka::Assignment::Group)
            })
            .collect();
        grouped.sort();
        if let Some(src) = grouped.first() {
            diags.push(loaded.diagnostic(
                &["sinks", id.as_str(), "exactly_once"],
                format!(
                    "exactly_once needs each partition read by one run at a time, but source `{src}` uses \
                     assignment = \"group\", which hands partitions over with records in flight (at-least-once)"
                ),
                Some(format!(
                    "read `{src}` with assignment = \"assign\" (one run, or workers under the coordinator), or turn exactly_once off"
                )),
            ));
        }
        let mut twice: Vec<(&str, usize)> = sources.into_iter().filter(|(_, n)| *n > 1).collect();
        twice.sort();
        if let Some((src, n)) = twice.first() {
            diags.push(loaded.diagnostic(
                &["sinks", id.as_str(), "inputs"],
                format!(
                    "with exactly_once, each source's records must reach the sink by one path, but `{src}`'s \
                     records arrive by {n} paths: their positions interleave, and a replay could skip records that were never written"
                ),
                Some(format!(
                    "read `{src}` through one chain of transforms (no paths that split and meet again), or turn exactly_once off"
                )),
            ));
        }
    }
}

/// Transforms ordered so each comes after its inputs; reports cycles.
fn topo_order(loaded: &LoadedPipeline, diags: &mut Vec<Diagnostic>) -> Option<Vec<String>> {
    let transforms = &loaded.file.transforms;
    let mut order = Vec::new();
    let mut state: HashMap<&str, u8> = HashMap::new(); // 1 = visiting, 2 = done
    fn visit<'a>(
        id: &'a str,
        transforms: &'a indexmap::IndexMap<String, TransformConfig>,
        state: &mut HashMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
        order: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        match state.get(id) {
            Some(2) => return Ok(()),
            Some(1) => {
                let start = stack.iter().position(|s| *s == id).unwrap_or(0);
                let mut cycle: Vec<String> = stack[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(id.to_string());
                return Err(cycle);
            }
            _ => {}
        }
        state.insert(id, 1);
        stack.push(id);
        for input in transforms[id].inputs() {
            if transforms.contains_key(input) {
                visit(input, transforms, state, stack, order)?;
            }
        }
        stack.pop();
        state.insert(id, 2);
        order.push(id.to_string());
        Ok(())
    }
    for id in transforms.keys() {
        let mut stack = Vec::new();
        if let Err(cycle) = visit(id, transforms, &mut state, &mut stack, &mut order) {
            diags.push(loaded.diagnostic(
                &["transforms", &cycle[0], "inputs"],
                format!("the inputs form a cycle: {}", cycle.join(" → ")),
                Some("data must flow from sources to sinks; break the cycle".into()),
            ));
            return None;
        }
    }
    Some(order)
}
