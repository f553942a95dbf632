//! Newline-delimited JSON to Arrow: the fast path of [`super::json_fast`] where it applies, else
//! arrow-json's vectorized decoder.

use std::sync::atomic::{AtomicU32, Ordering};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use super::decimal_guard::{might_be_unsafe, DecimalGuard};
use super::json_fast::FastJson;
use super::ChunkDecoder;
use crate::dead_letter::Stage;

/// Decodes NDJSON objects against a fixed schema. Extra fields are ignored, missing nullable fields
/// are null, and a record whose value does not fit its column's type is bad.
pub struct JsonDecoder {
    schema: SchemaRef,
    /// Set when the schema has decimals: see [`super::decimal_guard`].
    guard: Option<DecimalGuard>,
    /// Set when every column type is one the fast path decodes.
    fast: Option<FastJson>,
    /// Chunks in a row the fast path gave up on: past `skip_after`, it tries only one chunk in
    /// [`FAST_RETRY_EVERY`], so input it never takes costs next to nothing.
    misses: AtomicU32,
    /// [`FAST_MISSES`]; `u32::MAX` (never skip) where the fast path is checked against arrow-json.
    skip_after: u32,
}

/// Whether `SLUICE_JSON_FAST_PATH=0` is set; said once in the log.
fn fast_path_disabled() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| {
        let off = std::env::var_os("SLUICE_JSON_FAST_PATH").is_some_and(|v| v == "0");
        if off {
            tracing::info!("SLUICE_JSON_FAST_PATH=0: JSON is decoded by arrow-json alone, without the fast path");
        }
        off
    })
}

/// Misses in a row after which the fast path is tried only now and then.
const FAST_MISSES: u32 = 8;
/// How often it is tried then: once every this many chunks.
const FAST_RETRY_EVERY: u32 = 64;

impl JsonDecoder {
    /// With the fast path where the schema allows it, unless `SLUICE_JSON_FAST_PATH=0` is set
    /// (to measure arrow-json alone against it, or to rule it out).
    pub fn new(schema: SchemaRef) -> Self {
        if fast_path_disabled() {
            return Self::arrow_only(schema);
        }
        JsonDecoder { fast: FastJson::new(&schema), ..Self::arrow_only(schema) }
    }

    /// The fast path on every chunk, however many it gave up on: for the differential checks,
    /// which must compare it with arrow-json on every input, not only until it stops trying.
    pub(crate) fn always_fast(schema: SchemaRef) -> Self {
        JsonDecoder { skip_after: u32::MAX, ..Self::new(schema) }
    }

    /// arrow-json alone, without the fast path: what the fast path is checked and measured against.
    pub fn arrow_only(schema: SchemaRef) -> Self {
        JsonDecoder {
            guard: DecimalGuard::new(&schema, false),
            fast: None,
            misses: AtomicU32::new(0),
            skip_after: FAST_MISSES,
            schema,
        }
    }

    /// Whether chunks try the fast path first.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// The first decimal value in `bytes` that arrow would misread, as an error message.
    fn unsafe_decimal(&self, bytes: &[u8], rows: usize) -> Option<String> {
        let guard = self.guard.as_ref()?;
        if !might_be_unsafe(bytes, true) {
            return None;
        }
        // Numbers as their text (coerce_primitive); a chunk that does not decode this way has
        // a fault of its own, which the real decode reports.
        let mut decoder = arrow::json::ReaderBuilder::new(guard.check_schema())
            .with_batch_size(rows.max(1))
            .with_strict_mode(false)
            .with_coerce_primitive(true)
            .build_decoder()
            .ok()?;
        decoder.decode(bytes).ok()?;
        guard.first_unsafe(&decoder.flush().ok()??)
    }
}

impl ChunkDecoder for JsonDecoder {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn decode(&self, bytes: &[u8], rows: usize) -> Result<RecordBatch, (Stage, String)> {
        if let Some(fast) = &self.fast {
            let misses = self.misses.load(Ordering::Relaxed);
            if misses < self.skip_after || misses.is_multiple_of(FAST_RETRY_EVERY) {
                if let Some(batch) = fast.decode(bytes, rows) {
                    self.misses.store(0, Ordering::Relaxed);
                    return Ok(batch);
                }
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(e) = self.unsafe_decimal(bytes, rows) {
            return Err((Stage::Convert, e));
        }
        let mut decoder = arrow::json::ReaderBuilder::new(self.schema.clone())
            .with_batch_size(rows.max(1))
            .with_strict_mode(false)
            .build_decoder()
            .map_err(|e| (Stage::Convert, e.to_string()))?;
        let consumed = decoder.decode(bytes).map_err(|e| (Stage::Decode, clean(e)))?;
        if bytes[consumed..].iter().any(|b| !b.is_ascii_whitespace()) {
            return Err((Stage::Decode, "more than one JSON value on the line; write one object per line".into()));
        }
        if decoder.has_partial_record() {
            return Err((Stage::Decode, "incomplete JSON value (the line ends inside an object or string)".into()));
        }
        let batch = decoder
            .flush()
            .map_err(|e| (Stage::Convert, clean(e)))?
            .unwrap_or_else(|| RecordBatch::new_empty(self.schema.clone()));
        if batch.num_rows() != rows {
            let msg = if batch.num_rows() < rows {
                "the line holds no JSON object"
            } else {
                "more than one JSON value on the line; write one object per line"
            };
            return Err((Stage::Decode, msg.into()));
        }
        Ok(batch)
    }
}

/// Drops the `Json error: ` prefix Arrow puts on every message.
fn clean(e: arrow::error::ArrowError) -> String {
    let s = e.to_string();
    s.strip_prefix("Json error: ").map(str::to_string).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::types::schema_from_columns;
    use crate::format::{decode_chunk, LineChunk};
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Decimal128Type, Int64Type};
    use indexmap::IndexMap;

    fn schema() -> SchemaRef {
        let cols: IndexMap<String, String> =
            [("id", "bigint not null"), ("amount", "decimal(12,2)"), ("name", "varchar")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        schema_from_columns(&cols).unwrap()
    }

    fn chunk(lines: &[&str]) -> LineChunk {
        let mut c = LineChunk::new();
        for (i, l) in lines.iter().enumerate() {
            c.push(l.as_bytes(), i as u64 + 1);
        }
        c
    }

    #[test]
    fn decodes_good_rows_and_isolates_each_kind_of_bad_one() {
        let c = chunk(&[
            r#"{"id": 1, "amount": "12.34", "name": "Zoë", "extra": true}"#,
            r#"{"id": 2, "amount": 5}"#,
            r#"{"id": 3, "amount": "abc"}"#,
            r#"{"id": 4, "amount": 1.5"#,
            r#"{"amount": 7}"#,
            r#"{"id": null}"#,
            r#"{"id": 5, "amount": null, "name": null}"#,
            r#"{"id": 6}{"id": 7}"#,
        ]);
        let d = decode_chunk(&JsonDecoder::new(schema()), &c).unwrap();
        assert_eq!(d.positions, vec![1, 2, 7]);
        let ids: Vec<i64> = d.batch.column(0).as_primitive::<Int64Type>().values().to_vec();
        assert_eq!(ids, vec![1, 2, 5]);
        let amounts = d.batch.column(1).as_primitive::<Decimal128Type>();
        assert_eq!((amounts.value(0), amounts.value(1)), (1234, 500), "decimals are exact");
        assert!(amounts.is_null(2));
        assert_eq!(d.batch.column(2).as_string::<i32>().value(0), "Zoë");
        let bad: Vec<(u64, Stage)> = d.bad.iter().map(|b| (b.position.unwrap(), b.stage)).collect();
        assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), vec![3, 4, 5, 6, 8]);
        assert_eq!(bad[0].1, Stage::Convert, "{:?}", d.bad[0]);
        assert_eq!(bad[1].1, Stage::Decode, "{:?}", d.bad[1]);
        assert_eq!(d.bad[0].raw, br#"{"id": 3, "amount": "abc"}"#);
        assert!(d.bad.iter().all(|b| !b.error.is_empty()));
    }

    /// arrow's decimal parser panics (debug) or wraps (release: `1E65537` reads as 10) on these:
    /// each is a bad record naming the column and the value, and the records around it flow.
    #[test]
    fn decimals_arrow_would_misread_are_bad_records_and_the_rest_flow() {
        let c = chunk(&[
            r#"{"id": 1, "amount": 1.5e3}"#,
            r#"{"id": 2, "amount": 1E65537}"#,
            r#"{"id": 3, "amount": "1.E202021", "name": "e"}"#,
            r#"{"id": 4, "amount": -1e-99999}"#,
            r#"{"id": 5, "amount": "\u0031e99999"}"#,
            r#"{"id": 6, "amount": 12.5, "name": "12345678901234567890123456789012345678901e99999"}"#,
        ]);
        let d = decode_chunk(&JsonDecoder::new(schema()), &c).unwrap();
        assert_eq!(d.positions, vec![1, 6], "{:?}", d.bad);
        let amounts = d.batch.column(1).as_primitive::<Decimal128Type>();
        assert_eq!((amounts.value(0), amounts.value(1)), (150_000, 1250));
        assert_eq!(d.bad.iter().map(|b| b.position.unwrap()).collect::<Vec<_>>(), vec![2, 3, 4, 5]);
        for b in &d.bad {
            assert_eq!(b.stage, Stage::Convert);
            assert!(b.error.starts_with("column `amount`: the decimal value `"), "{}", b.error);
            assert!(b.error.contains("outside the range sluice reads exactly"), "{}", b.error);
        }
        assert!(
            d.bad[0].error.contains("`1E65537`") && d.bad[0].error.contains("exponent 65537"),
            "{}",
            d.bad[0].error
        );
    }

    #[test]
    fn input_the_fast_path_never_takes_still_decodes_as_arrow_json_after_it_stops_trying() {
        let fast = JsonDecoder::new(schema());
        let arrow_only = JsonDecoder::arrow_only(schema());
        assert!(fast.has_fast_path() && !arrow_only.has_fast_path());
        // An escaped key: outside the fast path, fine for arrow-json.
        let left = chunk(&[r#"{"id": 1, "na\u006de": "x"}"#, r#"{"id": 2, "amount": 1.5e1}"#]);
        let plain = chunk(&[r#"{"id": 3, "amount": 4.25, "name": "y"}"#, r#"{"id": 4}"#]);
        for round in 0..3 * FAST_RETRY_EVERY {
            let c = if round % 50 == 49 { &plain } else { &left };
            let (a, b) = (decode_chunk(&fast, c).unwrap(), decode_chunk(&arrow_only, c).unwrap());
            assert_eq!((a.batch, a.positions), (b.batch, b.positions), "round {round}");
            assert!(a.bad.is_empty() && b.bad.is_empty());
        }
        assert!(fast.misses.load(Ordering::Relaxed) > FAST_MISSES, "it stopped trying every chunk");
    }
}
