//! CSV to Arrow with arrow-csv's vectorized decoder, and a record splitter that honours quotes.

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use serde::Deserialize;

use super::decimal_guard::{might_be_unsafe, DecimalGuard};
use super::ChunkDecoder;
use crate::dead_letter::Stage;

/// CSV settings (`format = { type = "csv", ... }`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// Field delimiter, one character.
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// Whether the first record of each file is a header (skipped; columns are matched by the
    /// schema's order).
    #[serde(default = "default_header")]
    pub header: bool,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions { delimiter: default_delimiter(), header: default_header() }
    }
}

fn default_delimiter() -> char {
    ','
}
fn default_header() -> bool {
    true
}

/// Decodes CSV records against a fixed schema; empty fields are null.
pub struct CsvDecoder {
    schema: SchemaRef,
    delimiter: u8,
    /// Set when the schema has decimals: see [`super::decimal_guard`].
    guard: Option<DecimalGuard>,
}

impl CsvDecoder {
    pub fn new(schema: SchemaRef, options: &CsvOptions) -> Self {
        CsvDecoder { guard: DecimalGuard::new(&schema, true), schema, delimiter: options.delimiter as u8 }
    }

    /// The first decimal value in `bytes` that arrow would misread, as an error message.
    fn unsafe_decimal(&self, bytes: &[u8], rows: usize) -> Option<String> {
        let guard = self.guard.as_ref()?;
        if !might_be_unsafe(bytes, false) {
            return None;
        }
        // Every column as text; records that do not split into the schema's columns have a fault
        // of their own, which the real decode reports.
        let mut decoder = self.arrow_decoder(guard.check_schema(), rows);
        feed(&mut decoder, bytes).ok()?;
        guard.first_unsafe(&decoder.flush().ok()??)
    }

    fn arrow_decoder(&self, schema: SchemaRef, rows: usize) -> arrow::csv::reader::Decoder {
        arrow::csv::ReaderBuilder::new(schema)
            .with_header(false)
            .with_delimiter(self.delimiter)
            .with_batch_size(rows.max(1))
            .build_decoder()
    }
}

/// Feeds all of `bytes` to `decoder` and ends its input; returns how many bytes it took.
fn feed(decoder: &mut arrow::csv::reader::Decoder, bytes: &[u8]) -> Result<usize, arrow::error::ArrowError> {
    let mut offset = 0;
    while offset < bytes.len() {
        match decoder.decode(&bytes[offset..])? {
            0 => break,
            n => offset += n,
        }
    }
    decoder.decode(&[])?;
    Ok(offset)
}

impl ChunkDecoder for CsvDecoder {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn decode(&self, bytes: &[u8], rows: usize) -> Result<RecordBatch, (Stage, String)> {
        if let Some(e) = self.unsafe_decimal(bytes, rows) {
            return Err((Stage::Convert, e));
        }
        let mut decoder = self.arrow_decoder(self.schema.clone(), rows);
        let offset = feed(&mut decoder, bytes).map_err(|e| (Stage::Decode, e.to_string()))?;
        let batch = decoder
            .flush()
            .map_err(|e| (Stage::Convert, e.to_string()))?
            .unwrap_or_else(|| RecordBatch::new_empty(self.schema.clone()));
        if batch.num_rows() != rows || offset < bytes.len() {
            return Err((Stage::Decode, format!("expected {rows} CSV record(s), found {}", batch.num_rows())));
        }
        Ok(batch)
    }
}

/// Tracks whether a CSV record continues past a line break (inside a quoted field). Quotes only
/// open a quoted field at the start of a field, as RFC 4180 has it: `5,12" pizza,x` is one record.
#[derive(Debug)]
pub struct RecordSplitter {
    delimiter: u8,
    in_quotes: bool,
}

impl RecordSplitter {
    pub fn new(delimiter: u8) -> Self {
        RecordSplitter { delimiter, in_quotes: false }
    }

    /// The field delimiter.
    pub fn delimiter(&self) -> u8 {
        self.delimiter
    }

    /// Feeds one physical line; returns true when it completes a record.
    pub fn line_ends_record(&mut self, line: &[u8]) -> bool {
        #[derive(Clone, Copy, PartialEq)]
        enum S {
            FieldStart,
            Unquoted,
            Quoted,
            QuoteInQuoted,
        }
        let mut s = if self.in_quotes { S::Quoted } else { S::FieldStart };
        for &b in line {
            s = match (s, b) {
                (S::FieldStart, b'"') => S::Quoted,
                (S::FieldStart | S::Unquoted | S::QuoteInQuoted, d) if d == self.delimiter => S::FieldStart,
                (S::FieldStart | S::Unquoted, _) => S::Unquoted,
                (S::Quoted, b'"') => S::QuoteInQuoted,
                (S::Quoted, _) => S::Quoted,
                (S::QuoteInQuoted, b'"') => S::Quoted,
                (S::QuoteInQuoted, _) => S::Unquoted,
            };
        }
        self.in_quotes = s == S::Quoted;
        !self.in_quotes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::types::schema_from_columns;
    use crate::format::{decode_chunk, LineChunk};
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Decimal128Type, Int64Type};
    use indexmap::IndexMap;

    /// A decoder for `id bigint not null, amount decimal(10,2), <text> varchar`.
    fn decoder(text: &str) -> CsvDecoder {
        let cols: IndexMap<String, String> =
            [("id", "bigint not null"), ("amount", "decimal(10,2)"), (text, "varchar")]
                .into_iter()
                .map(|(a, b)| (a.into(), b.into()))
                .collect();
        CsvDecoder::new(schema_from_columns(&cols).unwrap(), &CsvOptions::default())
    }

    /// `lines` as records at positions 2, 3, ... (after a header).
    fn chunk(lines: &[&str]) -> LineChunk {
        let mut c = LineChunk::new();
        for (i, l) in lines.iter().enumerate() {
            c.push(l.as_bytes(), i as u64 + 2);
        }
        c
    }

    #[test]
    fn decodes_and_isolates_bad_rows() {
        let c = chunk(&["1,2.50,Köln", "2,abc,Paris", "3,,\"Rome, IT\"", "4,1.00", ",3.00,Oslo"]);
        let d = decode_chunk(&decoder("city"), &c).unwrap();
        assert_eq!(d.batch.column(0).as_primitive::<Int64Type>().values().to_vec(), vec![1, 3]);
        assert_eq!(d.batch.column(1).as_primitive::<Decimal128Type>().value(0), 250);
        assert!(d.batch.column(1).is_null(1));
        assert_eq!(d.batch.column(2).as_string::<i32>().value(1), "Rome, IT");
        assert_eq!(d.bad.iter().map(|b| b.position.unwrap()).collect::<Vec<_>>(), vec![3, 5, 6]);
    }

    #[test]
    fn quoted_newlines_continue_a_record() {
        let mut s = RecordSplitter::new(b',');
        assert!(s.line_ends_record(b"1,plain"));
        assert!(s.line_ends_record(b"5,12\" pizza,x"), "a quote inside an unquoted field is a literal");
        assert!(!s.line_ends_record(b"2,\"starts"));
        assert!(!s.line_ends_record(b"still \"\"quoted\"\" inside"));
        assert!(s.line_ends_record(b"ends\""));
    }

    /// The fuzzer's find: arrow's decimal parser overflows its exponent counter on `1.E202021`.
    #[test]
    fn decimals_arrow_would_misread_are_bad_records_and_the_rest_flow() {
        let long = format!("3,{},x", "9".repeat(120));
        let c = chunk(&["1,2.5e2,1E65537", "2,1.E202021,x", long.as_str(), "4,\"-7e-9999\",y", "5,0.5,z"]);
        let d = decode_chunk(&decoder("code"), &c).unwrap();
        assert_eq!(d.batch.column(0).as_primitive::<Int64Type>().values().to_vec(), vec![1, 5], "{:?}", d.bad);
        assert_eq!(d.batch.column(1).as_primitive::<Decimal128Type>().value(0), 25_000);
        assert_eq!(d.batch.column(2).as_string::<i32>().value(0), "1E65537", "text columns are not checked");
        assert_eq!(d.bad.iter().map(|b| b.position.unwrap()).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(d.bad.iter().all(|b| b.error.starts_with("column `amount`: the decimal value")), "{:?}", d.bad);
        assert!(d.bad[1].error.contains("120 digits before the decimal point"), "{}", d.bad[1].error);
    }
}
