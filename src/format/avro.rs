//! Avro message values to Arrow with arrow-avro's vectorized decoder.
//!
//! Two framings:
//! - plain: each value is an Avro binary body written with the schema in `schema_file`;
//! - Confluent wire format (`schema_registry` set): magic byte `0`, the writer schema's id as a
//!   4-byte big-endian integer, then the body. Writer schemas are fetched from the registry by id
//!   (`GET /schemas/ids/{id}`, cached) and resolved to the reader schema `schema_file` by Avro's
//!   schema resolution, so every batch has the reader schema's columns whatever version wrote it.
//!
//! The reader schema is always a file, so a pipeline validates offline and its SQL plans against
//! fixed columns.
//!
//! A record that does not decode (a truncated body, trailing bytes, a wrong magic byte, an id the
//! registry does not know, values the reader schema cannot take) is returned bad with its error;
//! the decoder, which may hold part of that record, is rebuilt and the good records before it
//! decoded again, so each good record is decoded at most twice.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use serde::Deserialize;

use super::{Decoded, LineChunk};
use crate::dead_letter::{BadRecord, Stage};

/// The id plain bodies are registered under in the decoder's store (never on the wire).
const PLAIN_ID: u32 = 0;
/// What a plain body is prefixed with for the decoder: magic byte and [`PLAIN_ID`].
const PLAIN_PREFIX: [u8; 5] = [0, 0, 0, 0, 0];
/// Tries per registry request before the source fails (connection errors, 5xx, 429).
const REGISTRY_TRIES: u32 = 4;

/// `format = { type = "avro", schema_file = "...", schema_registry = { ... } }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AvroOptions {
    /// The reader schema (`.avsc`, JSON): the columns sluice produces.
    pub schema_file: PathBuf,
    /// Values are in the Confluent wire format, with writer schemas from this registry.
    pub schema_registry: Option<RegistryConfig>,
}

/// `schema_registry = { url = "http://registry:8081", username, password }`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub url: String,
    /// HTTP basic auth (Confluent Cloud: the API key and secret).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Per request (default 10s).
    pub timeout: Option<crate::config::HumanDuration>,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Ids the registry did not have that are remembered (their records are bad without asking it
/// again); past this, they are forgotten.
const UNKNOWN_IDS: usize = 1024;

/// Decodes Avro values of a [`LineChunk`] (pushed with [`LineChunk::push_keyed_raw`]).
pub struct AvroDecoder {
    reader_schema: AvroSchema,
    arrow_schema: SchemaRef,
    registry: Option<Registry>,
    /// Writer schemas by id; `Err` for ids the registry does not have (at most about
    /// [`UNKNOWN_IDS`] of those).
    writers: Mutex<HashMap<u32, Result<AvroSchema, String>>>,
    /// Held while fetching, so partitions that meet a new id together fetch it once.
    fetching: tokio::sync::Mutex<()>,
}

impl AvroDecoder {
    /// Reads and checks the reader schema; connects nothing.
    ///
    /// # Errors
    /// `(key, message)`: an unreadable or invalid schema file, a bad registry URL.
    pub fn new(options: &AvroOptions, base: Option<&Path>) -> Result<Self, (&'static str, String)> {
        let path = match base {
            Some(b) if options.schema_file.is_relative() => b.join(&options.schema_file),
            _ => options.schema_file.clone(),
        };
        let json = std::fs::read_to_string(&path)
            .map_err(|e| ("format.schema_file", format!("cannot read the Avro schema `{}`: {e}", path.display())))?;
        let reader_schema = AvroSchema::new(json);
        let registry = options.schema_registry.as_ref().map(Registry::new).transpose()?;
        let mut writers = HashMap::new();
        if registry.is_none() {
            writers.insert(PLAIN_ID, Ok(reader_schema.clone()));
        }
        let mut d = AvroDecoder {
            arrow_schema: SchemaRef::new(arrow::datatypes::Schema::empty()),
            reader_schema: reader_schema.clone(),
            registry,
            writers: Mutex::new(writers),
            fetching: tokio::sync::Mutex::new(()),
        };
        // The columns: what decoding with the reader schema as its own writer produces.
        let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        store
            .set(Fingerprint::Id(PLAIN_ID), reader_schema)
            .map_err(|e| ("format.schema_file", format!("`{}` is not a valid Avro schema: {e}", path.display())))?;
        let decoder = ReaderBuilder::new()
            .with_writer_schema_store(store)
            .with_active_fingerprint(Fingerprint::Id(PLAIN_ID))
            .build_decoder()
            .map_err(|e| ("format.schema_file", format!("`{}` cannot be read as Arrow: {e}", path.display())))?;
        let schema = decoder.schema();
        if schema.fields().is_empty() {
            return Err(("format.schema_file", format!("`{}` must be an Avro record with fields", path.display())));
        }
        // Without the Avro metadata arrow-avro adds, so batches compare equal downstream.
        let fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone().with_metadata(HashMap::new())).collect();
        d.arrow_schema = SchemaRef::new(arrow::datatypes::Schema::new(fields));
        Ok(d)
    }

    pub fn schema(&self) -> SchemaRef {
        self.arrow_schema.clone()
    }

    /// The registry's URL (for messages), when values are in the Confluent wire format.
    pub fn registry_url(&self) -> Option<&str> {
        self.registry.as_ref().map(|r| r.url.as_str())
    }

    /// Fetches the writer schemas of `chunk` that are not known yet.
    ///
    /// # Errors
    /// A registry that cannot be reached or answers 5xx after retries (the source stops: the
    /// records are not at fault). An id the registry does not have is not an error here: its
    /// records come out bad.
    pub async fn prepare(&self, chunk: &LineChunk) -> Result<(), String> {
        let Some(registry) = &self.registry else { return Ok(()) };
        let missing = self.missing(chunk);
        if missing.is_empty() {
            return Ok(());
        }
        let _one_at_a_time = self.fetching.lock().await;
        let missing = self.missing(chunk);
        {
            // Ids the registry does not have come from bad records (any 4 bytes after a zero
            // byte): remembering every one made memory grow with the bad input. Forgotten ones
            // are asked again if they come back.
            let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
            if writers.values().filter(|w| w.is_err()).count() + missing.len() > UNKNOWN_IDS {
                writers.retain(|_, w| w.is_ok());
            }
        }
        for id in missing {
            // A writer schema that does not resolve to the reader schema makes its records bad,
            // not the decoder unbuildable.
            let found = registry.schema(id).await?.and_then(|w| match self.resolver(id, &w) {
                Ok(()) => Ok(w),
                Err(e) => {
                    Err(format!("writer schema {id} from {} cannot be read as the reader schema: {e}", registry.url))
                }
            });
            self.writers.lock().unwrap_or_else(|e| e.into_inner()).insert(id, found);
        }
        Ok(())
    }

    /// Makes writer schema `id` known without asking the registry (the fuzz targets, which run
    /// without one).
    ///
    /// # Errors
    /// When `json` does not resolve to the reader schema.
    pub fn insert_writer_schema(&self, id: u32, json: &str) -> Result<(), String> {
        let writer = AvroSchema::new(json.to_string());
        self.resolver(id, &writer)?;
        self.writers.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Ok(writer));
        Ok(())
    }

    /// Checks that `writer` resolves to the reader schema.
    fn resolver(&self, id: u32, writer: &AvroSchema) -> Result<(), String> {
        let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        store.set(Fingerprint::Id(id), writer.clone()).map_err(|e| e.to_string())?;
        ReaderBuilder::new()
            .with_reader_schema(self.reader_schema.clone())
            .with_writer_schema_store(store)
            .build_decoder()
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Ids in `chunk` whose writer schema was not fetched yet.
    fn missing(&self, chunk: &LineChunk) -> Vec<u32> {
        let writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        let mut missing: Vec<u32> = Vec::new();
        for i in 0..chunk.len() {
            if let Some(id) = confluent_id(chunk.record_raw(i)) {
                if !writers.contains_key(&id) && !missing.contains(&id) {
                    missing.push(id);
                }
            }
        }
        missing
    }

    fn build(&self, rows: usize) -> Result<Decoder, String> {
        let writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        for (id, s) in writers.iter() {
            if let Ok(s) = s {
                store.set(Fingerprint::Id(*id), s.clone()).map_err(|e| format!("writer schema {id}: {e}"))?;
            }
        }
        if store.fingerprints().is_empty() {
            // No writer schema known (every id in sight is missing from the registry): the
            // decoder still needs one; `frame_error` keeps every record away from it.
            store.set(Fingerprint::Id(u32::MAX), self.reader_schema.clone()).map_err(|e| e.to_string())?;
        }
        ReaderBuilder::new()
            .with_batch_size(rows.max(1))
            .with_reader_schema(self.reader_schema.clone())
            .with_writer_schema_store(store)
            .build_decoder()
            .map_err(|e| e.to_string())
    }

    /// Why record `rec` cannot be fed, before feeding it: a frame error or an unknown id.
    fn frame_error(&self, rec: &[u8]) -> Option<String> {
        let registry = self.registry.as_ref()?;
        let Some(id) = confluent_id(rec) else {
            return Some(match rec.first() {
                None => "the value is empty".into(),
                Some(0) => format!("the value has {} bytes, fewer than the 5 of the Confluent header", rec.len()),
                Some(b) => format!(
                    "the value does not start with the Confluent wire format's magic byte 0 (it starts with {b:#04x}); is it Avro from a schema-registry serializer?"
                ),
            });
        };
        match self.writers.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            Some(Ok(_)) => None,
            Some(Err(e)) => Some(e.clone()),
            None => Some(format!("schema id {id} was not fetched from {}", registry.url)),
        }
    }

    /// Feeds one record; `Err` when it is bad (the decoder may then hold part of it). Rows the
    /// decoder flushes first (when the record's writer schema differs) go to `flushed`.
    fn feed(&self, dec: &mut Decoder, rec: &[u8], flushed: &mut Vec<RecordBatch>) -> Result<(), FeedError> {
        if let Some(e) = self.frame_error(rec) {
            return Err(e.into());
        }
        let rows = |d: &Decoder| d.batch_size() - d.capacity();
        let mut before = rows(dec);
        let trailing =
            |off: usize| format!("bytes are left after the Avro record (it ends before byte {off} of {})", rec.len());
        let mut off = 0;
        if self.registry.is_none() {
            dec.decode(&PLAIN_PREFIX).map_err(|e| e.to_string())?;
        }
        loop {
            let r = dec.decode(&rec[off..]);
            if matches!(r, Ok(5)) && off == 0 && self.registry.is_some() && before > 0 && dec.capacity() == 0 {
                // A new writer schema: the decoder took the header and wants the rows so far
                // flushed (it marks itself full) before it decodes the body.
                off = 5;
                if let Some(b) = dec.flush().map_err(|e| FeedError::Flush(e.to_string()))? {
                    flushed.push(b);
                }
                before = 0;
                continue;
            }
            let grown = rows(dec) > before;
            match r {
                Err(_) if grown => return Err(trailing(off).into()),
                Err(e) => {
                    return Err(
                        format!("the value does not decode with the writer schema: {}", clean(&e.to_string())).into()
                    )
                }
                Ok(n) => {
                    off += n;
                    if off == rec.len() {
                        break;
                    }
                    if grown {
                        return Err(trailing(off).into());
                    }
                    return Err(format!(
                        "the value ends before the Avro record does ({} bytes; the writer schema needs more)",
                        rec.len()
                    )
                    .into());
                }
            }
        }
        match rows(dec) - before {
            1 => Ok(()),
            0 => Err(format!(
                "the value ends before the Avro record does ({} bytes; the writer schema needs more)",
                rec.len()
            )
            .into()),
            _ => Err(String::from("the value holds more than one Avro record").into()),
        }
    }

    /// Decodes every record of `chunk`; bad ones come back with their error.
    ///
    /// # Errors
    /// Only a decoder that cannot be built (a schema bug, checked at start).
    pub fn decode_chunk(&self, chunk: &LineChunk) -> Result<Decoded, String> {
        let n = chunk.len();
        let mut batches = Vec::new();
        let mut positions = Vec::with_capacity(n);
        let mut bad = Vec::new();
        let mut dec = self.build(n)?;
        // Records fed since the last flush.
        let mut pending: Vec<usize> = Vec::new();
        for i in 0..n {
            let mut flushed = Vec::new();
            let fed = self.feed(&mut dec, chunk.record_raw(i), &mut flushed);
            if !flushed.is_empty() {
                batches.extend(flushed);
                positions.extend(pending.drain(..).map(|j| chunk.positions[j]));
            }
            match fed {
                Ok(()) => pending.push(i),
                // An earlier record held something only the flush checks (a string that is not
                // UTF-8): which one, only records decoded one by one tell.
                Err(FeedError::Flush(_)) => return self.decode_one_by_one(chunk),
                Err(FeedError::Bad(error)) => {
                    bad.push(BadRecord {
                        position: Some(chunk.positions[i]),
                        stage: Stage::Decode,
                        error,
                        raw: chunk.record_raw(i).to_vec(),
                        key: chunk.key(i),
                    });
                    // Start again without it: the good records since the last flush, then flush.
                    dec = self.build(n)?;
                    let mut again = Vec::new();
                    for &j in &pending {
                        let mut flushed = Vec::new();
                        if self.feed(&mut dec, chunk.record_raw(j), &mut flushed).is_err() {
                            return self.decode_one_by_one(chunk);
                        }
                        again.extend(flushed);
                    }
                    batches.extend(again);
                    match dec.flush() {
                        Ok(Some(b)) => batches.push(b),
                        Ok(None) => {}
                        Err(_) => return self.decode_one_by_one(chunk),
                    }
                    positions.extend(pending.drain(..).map(|j| chunk.positions[j]));
                }
            }
        }
        match dec.flush() {
            Ok(Some(b)) => batches.push(b),
            Ok(None) => {}
            Err(_) => return self.decode_one_by_one(chunk),
        }
        positions.extend(pending.drain(..).map(|j| chunk.positions[j]));
        self.assemble(batches, positions, bad)
    }

    /// [`decode_chunk`](Self::decode_chunk) record by record, each decoded and flushed alone: the
    /// slow path for a chunk whose flush failed.
    fn decode_one_by_one(&self, chunk: &LineChunk) -> Result<Decoded, String> {
        let (mut batches, mut positions, mut bad) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..chunk.len() {
            let mut dec = self.build(1)?;
            let mut flushed = Vec::new();
            let one = match self.feed(&mut dec, chunk.record_raw(i), &mut flushed) {
                Ok(()) => dec.flush().map_err(|e| {
                    (Stage::Convert, format!("the value does not convert to Arrow: {}", clean(&e.to_string())))
                }),
                Err(FeedError::Bad(e) | FeedError::Flush(e)) => Err((Stage::Decode, e)),
            };
            match one {
                Ok(Some(b)) if b.num_rows() == 1 => {
                    batches.push(b);
                    positions.push(chunk.positions[i]);
                }
                Ok(_) => return Err(format!("record {i} decoded alone did not give one row")),
                Err((stage, error)) => bad.push(BadRecord {
                    position: Some(chunk.positions[i]),
                    stage,
                    error,
                    raw: chunk.record_raw(i).to_vec(),
                    key: chunk.key(i),
                }),
            }
        }
        self.assemble(batches, positions, bad)
    }

    fn assemble(&self, batches: Vec<RecordBatch>, positions: Vec<u64>, bad: Vec<BadRecord>) -> Result<Decoded, String> {
        let columns: Vec<RecordBatch> = batches
            .into_iter()
            .map(|b| RecordBatch::try_new(self.arrow_schema.clone(), b.columns().to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("a decoded batch does not have the reader schema's columns: {e}"))?;
        let batch = arrow::compute::concat_batches(&self.arrow_schema, &columns).map_err(|e| e.to_string())?;
        debug_assert_eq!(batch.num_rows(), positions.len());
        Ok(Decoded { batch, positions, bad })
    }
}

/// Why [`AvroDecoder::feed`] refused a record.
enum FeedError {
    /// The record is bad.
    Bad(String),
    /// Flushing the rows before it failed (one of them holds what only the flush checks).
    Flush(String),
}

impl From<String> for FeedError {
    fn from(e: String) -> Self {
        FeedError::Bad(e)
    }
}

/// The schema id of a Confluent-framed value.
fn confluent_id(rec: &[u8]) -> Option<u32> {
    match rec {
        [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

fn clean(e: &str) -> String {
    e.strip_prefix("Parser error: ").unwrap_or(e).to_string()
}

/// A Confluent-compatible schema registry, read with `GET /schemas/ids/{id}`.
struct Registry {
    url: String,
    username: Option<String>,
    password: Option<String>,
    http: reqwest::Client,
}

/// The registry's answer to `GET /schemas/ids/{id}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaById {
    schema: String,
    /// Absent for Avro (the registry's default).
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

/// The registry's error body.
#[derive(Deserialize)]
struct RegistryError {
    error_code: Option<i64>,
    message: Option<String>,
}

impl Registry {
    fn new(c: &RegistryConfig) -> Result<Self, (&'static str, String)> {
        let url = c.url.trim_end_matches('/').to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err((
                "format.schema_registry.url",
                format!("the registry URL must start with http:// or https://, not `{url}`"),
            ));
        }
        if c.password.is_some() && c.username.is_none() {
            return Err(("format.schema_registry.username", "a registry password needs a `username`".into()));
        }
        let timeout = c.timeout.map_or(Duration::from_secs(10), |d| d.0);
        // reqwest's rustls has no crypto provider of its own: an https:// registry is reached
        // with sluice's (aws-lc-rs) and the system's roots.
        let tls = crate::coordinator::tls::ClientTls::default().config().map_err(|e| ("format.schema_registry", e))?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| ("format.schema_registry", format!("cannot build the HTTP client: {e}")))?;
        Ok(Registry { url, username: c.username.clone(), password: c.password.clone(), http })
    }

    /// `Ok(Ok(schema))`, `Ok(Err(why))` when the registry has no such Avro schema, `Err` when it
    /// cannot be asked.
    async fn schema(&self, id: u32) -> Result<Result<AvroSchema, String>, String> {
        let url = format!("{}/schemas/ids/{id}", self.url);
        let mut last = String::new();
        for attempt in 0..REGISTRY_TRIES {
            if attempt > 0 {
                let wait =
                    Duration::from_millis(200 * 2u64.pow(attempt)) + Duration::from_millis(rand::random_range(0..100));
                tokio::time::sleep(wait).await;
            }
            let mut req = self.http.get(&url).header(
                "Accept",
                "application/vnd.schemaregistry.v1+json, application/vnd.schemaregistry+json, application/json",
            );
            if let Some(user) = &self.username {
                req = req.basic_auth(user, self.password.as_deref());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = format!("GET {url}: {e}");
                    continue;
                }
            };
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if status.is_success() {
                let body: SchemaById = serde_json::from_str(&text)
                    .map_err(|e| format!("GET {url}: the answer is not a schema registry's ({e})"))?;
                if let Some(t) = body.schema_type.as_deref().filter(|t| !t.eq_ignore_ascii_case("AVRO")) {
                    return Ok(Err(format!("schema id {id} in {} is a {t} schema, not Avro", self.url)));
                }
                if !body.references.is_empty() {
                    return Ok(Err(format!(
                        "schema id {id} in {} uses schema references, which sluice does not resolve",
                        self.url
                    )));
                }
                tracing::info!(registry = %self.url, id, "fetched a writer schema");
                return Ok(Ok(AvroSchema::new(body.schema)));
            }
            let detail = serde_json::from_str::<RegistryError>(&text)
                .ok()
                .map(|e| format!("{} {}", e.error_code.unwrap_or(0), e.message.unwrap_or_default()))
                .unwrap_or_else(|| text.chars().take(200).collect());
            if status == reqwest::StatusCode::NOT_FOUND {
                return Ok(Err(format!("schema id {id} is not in the registry at {} ({detail})", self.url)));
            }
            last = format!("GET {url} answered {status}: {detail}");
            if !(status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS) {
                break;
            }
        }
        Err(format!("cannot read writer schema {id} from the schema registry: {last}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    use std::sync::Arc;

    const SCHEMA: &str = r#"{"type":"record","name":"Order","fields":[
        {"name":"order_id","type":"long"},
        {"name":"country","type":["null","string"],"default":null}]}"#;

    /// Avro binary of `{order_id, country}` (zig-zag varint long, union index, string).
    fn body(id: i64, country: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        zigzag(id, &mut out);
        match country {
            None => zigzag(0, &mut out),
            Some(c) => {
                zigzag(1, &mut out);
                zigzag(c.len() as i64, &mut out);
                out.extend_from_slice(c.as_bytes());
            }
        }
        out
    }

    fn zigzag(v: i64, out: &mut Vec<u8>) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }

    fn decoder() -> AvroDecoder {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.avsc");
        std::fs::write(&p, SCHEMA).unwrap();
        AvroDecoder::new(&AvroOptions { schema_file: p, schema_registry: None }, None).unwrap()
    }

    #[test]
    fn plain_bodies_decode_and_bad_ones_are_isolated_with_the_rest_kept() {
        let d = decoder();
        let mut chunk = LineChunk::new();
        let mut truncated = body(3, Some("abcdef"));
        truncated.truncate(4);
        let mut trailing = body(4, None);
        trailing.extend_from_slice(&[1, 2, 3]);
        let records = [body(1, Some("de")), body(2, None), truncated, trailing, body(5, Some("Zürich"))];
        for (i, r) in records.iter().enumerate() {
            chunk.push_keyed_raw(r, 100 + i as u64, None);
        }
        let out = d.decode_chunk(&chunk).unwrap();
        let ids: Vec<i64> = out.batch.column(0).as_primitive::<Int64Type>().values().to_vec();
        assert_eq!(ids, [1, 2, 5]);
        assert_eq!(out.positions, [100, 101, 104]);
        let c = out.batch.column(1).as_string::<i32>();
        assert_eq!((c.value(0), c.is_null(1), c.value(2)), ("de", true, "Zürich"));
        let bad: Vec<(u64, &str)> = out.bad.iter().map(|b| (b.position.unwrap(), b.error.as_str())).collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert_eq!(bad[0].0, 102);
        assert_eq!(bad[1].0, 103);
        assert!(bad[1].1.contains("left after"), "{bad:?}");
        assert_eq!(out.bad[0].raw, records[2]);
    }

    /// Writer schemas 1 (the reader's) and 2 (an added field) interleaved, and an id the registry
    /// did not have: rows in order, the evolved ones read with the reader schema.
    #[test]
    fn confluent_frames_switch_writer_schemas_mid_chunk_and_unknown_ids_are_bad() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.avsc");
        std::fs::write(&p, SCHEMA).unwrap();
        let registry =
            RegistryConfig { url: "http://127.0.0.1:9".into(), username: None, password: None, timeout: None };
        let d = AvroDecoder::new(&AvroOptions { schema_file: p, schema_registry: Some(registry) }, None).unwrap();
        let v2 = SCHEMA.replace("\"default\":null}]", "\"default\":null},{\"name\":\"coupon\",\"type\":\"string\"}]");
        assert_ne!(v2, SCHEMA);
        {
            let mut w = d.writers.lock().unwrap();
            w.insert(1, Ok(AvroSchema::new(SCHEMA.into())));
            w.insert(2, Ok(AvroSchema::new(v2)));
            w.insert(5, Err("schema id 5 is not in the registry".into()));
        }
        let frame = |id: u32, body: Vec<u8>| {
            let mut f = vec![0];
            f.extend_from_slice(&id.to_be_bytes());
            f.extend(body);
            f
        };
        let with_coupon = |id: i64| {
            let mut b = body(id, Some("fr"));
            zigzag(4, &mut b);
            b.extend_from_slice(b"SAVE");
            b
        };
        let records = [
            frame(1, body(1, None)),
            frame(2, with_coupon(2)),
            frame(2, with_coupon(3)),
            frame(5, body(4, None)),
            frame(1, body(5, Some("it"))),
            vec![0x07, 1, 2],
            frame(2, with_coupon(7)),
        ];
        let mut chunk = LineChunk::new();
        for (i, r) in records.iter().enumerate() {
            chunk.push_keyed_raw(r, i as u64, None);
        }
        let out = d.decode_chunk(&chunk).unwrap();
        let ids: Vec<i64> = out.batch.column(0).as_primitive::<Int64Type>().values().to_vec();
        assert_eq!(ids, [1, 2, 3, 5, 7]);
        assert_eq!(out.positions, [0, 1, 2, 4, 6]);
        assert_eq!(out.batch.num_columns(), 2, "the reader schema's columns only");
        assert_eq!(out.batch.column(1).as_string::<i32>().value(1), "fr");
        let bad: Vec<(u64, String)> = out.bad.iter().map(|b| (b.position.unwrap(), b.error.clone())).collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].0 == 3 && bad[0].1.contains("schema id 5"), "{bad:?}");
        assert!(bad[1].0 == 5 && bad[1].1.contains("magic byte 0"), "{bad:?}");
    }

    /// Requests counted, and what was wrong with them.
    type RequestLog = (usize, Vec<String>);

    /// A registry that has no schema: answers every `GET /schemas/ids/{id}` with 404 and error
    /// 40403, as the Confluent API documents it; counts the requests and what was wrong with them.
    fn empty_registry() -> (String, Arc<Mutex<RequestLog>>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new((0, Vec::new())));
        let seen = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
                let request = lines.next().and_then(|l| l.ok()).unwrap_or_default();
                let headers: Vec<String> = lines.map_while(|l| l.ok()).take_while(|l| !l.is_empty()).collect();
                let mut log = seen.lock().unwrap();
                log.0 += 1;
                let path = request.strip_prefix("GET ").and_then(|r| r.strip_suffix(" HTTP/1.1")).unwrap_or("");
                let id = path.strip_prefix("/schemas/ids/").and_then(|i| i.parse::<u32>().ok());
                if id.is_none() {
                    log.1.push(format!("not GET /schemas/ids/{{id}}: {request}"));
                }
                if !headers.iter().any(|h| {
                    h.to_ascii_lowercase().starts_with("accept:")
                        && h.contains("application/vnd.schemaregistry.v1+json")
                }) {
                    log.1.push(format!("no Accept of the registry's media type: {headers:?}"));
                }
                let body = format!("{{\"error_code\":40403,\"message\":\"Schema {} not found\"}}", id.unwrap_or(0));
                let _ = write!(
                    conn,
                    "HTTP/1.1 404 Not Found\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, log)
    }

    #[tokio::test]
    async fn ids_the_registry_does_not_have_are_remembered_up_to_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.avsc");
        std::fs::write(&p, SCHEMA).unwrap();
        let (url, log) = empty_registry();
        let registry = RegistryConfig { url, username: None, password: None, timeout: None };
        let d = AvroDecoder::new(&AvroOptions { schema_file: p, schema_registry: Some(registry) }, None).unwrap();
        // Bad records: a zero byte, then ids 0, 1, 2, ... none of which the registry has.
        let chunk_of = |ids: std::ops::Range<u32>| {
            let mut chunk = LineChunk::new();
            for id in ids {
                let mut rec = vec![0];
                rec.extend_from_slice(&id.to_be_bytes());
                rec.extend(body(1, None));
                chunk.push_keyed_raw(&rec, u64::from(id), None);
            }
            chunk
        };
        let unknown = |d: &AvroDecoder| d.writers.lock().unwrap().values().filter(|w| w.is_err()).count();
        let first = chunk_of(0..300);
        d.prepare(&first).await.unwrap();
        assert_eq!((unknown(&d), log.lock().unwrap().0), (300, 300));
        // Known unknowns are not asked again; their records are bad, naming the registry's answer.
        d.prepare(&first).await.unwrap();
        assert_eq!(log.lock().unwrap().0, 300);
        let out = d.decode_chunk(&first).unwrap();
        assert_eq!((out.batch.num_rows(), out.bad.len()), (0, 300));
        assert!(out.bad[7].error.contains("schema id 7 is not in the registry") && out.bad[7].error.contains("40403"));
        // Thousands more: what is remembered stays bounded.
        for start in (300..5000).step_by(300) {
            let chunk = chunk_of(start..start + 300);
            d.prepare(&chunk).await.unwrap();
            assert!(unknown(&d) <= UNKNOWN_IDS, "{} unknown ids remembered", unknown(&d));
            let out = d.decode_chunk(&chunk).unwrap();
            assert_eq!(out.bad.len(), 300, "every record of the chunk is bad, none unfetched");
            assert!(out.bad.iter().all(|b| b.error.contains("not in the registry")), "{:?}", out.bad[0].error);
        }
        let log = log.lock().unwrap();
        assert!(log.1.is_empty(), "requests the registry API would not take: {:?}", &log.1[..log.1.len().min(3)]);
    }

    #[test]
    fn the_schema_has_the_reader_schemas_columns_and_a_bad_schema_file_is_named() {
        let d = decoder();
        let schema = d.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["order_id", "country"]);
        assert!(!d.schema().field(0).is_nullable() && d.schema().field(1).is_nullable());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.avsc");
        std::fs::write(&p, "{\"type\": \"recrod\"}").unwrap();
        let e = AvroDecoder::new(&AvroOptions { schema_file: p, schema_registry: None }, None).err().unwrap();
        assert_eq!(e.0, "format.schema_file");
        assert!(e.1.contains("bad.avsc"), "{}", e.1);
        let e = AvroDecoder::new(&AvroOptions { schema_file: "/nonexistent.avsc".into(), schema_registry: None }, None)
            .err()
            .unwrap();
        assert!(e.1.contains("cannot read"), "{}", e.1);
    }
}
