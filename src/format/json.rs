//! Newline-delimited JSON to Arrow with arrow-json's vectorized decoder.

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use super::ChunkDecoder;
use crate::dead_letter::Stage;

/// Decodes NDJSON objects against a fixed schema. Extra fields are ignored, missing nullable fields
/// are null, and a record whose value does not fit its column's type is bad.
pub struct JsonDecoder {
    schema: SchemaRef,
}

impl JsonDecoder {
    pub fn new(schema: SchemaRef) -> Self {
        JsonDecoder { schema }
    }
}

impl ChunkDecoder for JsonDecoder {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn decode(&self, bytes: &[u8], rows: usize) -> Result<RecordBatch, (Stage, String)> {
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
}
