//! Bytes to Arrow: vectorized JSON and CSV decoding with row-level isolation of bad records.
//!
//! Decoders work on a [`LineChunk`], many records in one contiguous buffer. The whole chunk is
//! decoded in one call (the fast path); only when that fails is the chunk bisected to find the bad
//! records, which are returned with their error while every good record is still decoded in bulk.

pub mod avro;
pub mod csv;
pub mod decimal_guard;
pub mod json;
pub mod json_fast;

use std::ops::Range;

use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use crate::dead_letter::{BadRecord, Stage};

/// Many records in one buffer, with where each starts and its source position.
#[derive(Debug, Default, Clone)]
pub struct LineChunk {
    pub buf: Vec<u8>,
    /// `starts[i]..starts[i + 1]` is record `i` (with its line terminator); one more entry than
    /// records.
    pub starts: Vec<usize>,
    /// Source position (1-based line number) of each record.
    pub positions: Vec<u64>,
    /// Record keys (Kafka), kept for dead letters: `key_spans[i]` is the range of record `i`'s key
    /// in `key_buf`. Empty when the source has no keys.
    pub key_buf: Vec<u8>,
    pub key_spans: Vec<Option<(usize, usize)>>,
}

impl LineChunk {
    pub fn new() -> Self {
        LineChunk {
            buf: Vec::new(),
            starts: vec![0],
            positions: Vec::new(),
            key_buf: Vec::new(),
            key_spans: Vec::new(),
        }
    }

    /// Makes room for `records` more records of `bytes` bytes in all.
    pub fn reserve(&mut self, records: usize, bytes: usize) {
        self.buf.reserve(bytes);
        self.starts.reserve(records);
        self.positions.reserve(records);
    }

    /// Appends one record with its key.
    pub fn push_keyed(&mut self, record: &[u8], position: u64, key: Option<&[u8]>) {
        self.push(record, position);
        self.push_key(key);
    }

    /// The key of the record pushed last.
    fn push_key(&mut self, key: Option<&[u8]>) {
        self.key_spans.resize(self.positions.len() - 1, None);
        self.key_spans.push(key.map(|k| {
            self.key_buf.extend_from_slice(k);
            (self.key_buf.len() - k.len(), self.key_buf.len())
        }));
    }

    /// Appends one binary record as it is (no line terminator: see [`record_raw`](Self::record_raw)).
    pub fn push_keyed_raw(&mut self, record: &[u8], position: u64, key: Option<&[u8]>) {
        self.buf.extend_from_slice(record);
        self.starts.push(self.buf.len());
        self.positions.push(position);
        self.push_key(key);
    }

    /// The bytes of record `i` exactly as pushed with [`push_keyed_raw`](Self::push_keyed_raw).
    pub fn record_raw(&self, i: usize) -> &[u8] {
        self.slice(i..i + 1)
    }

    /// The key of record `i`, when it has one.
    pub fn key_bytes(&self, i: usize) -> Option<&[u8]> {
        self.key_spans.get(i).copied().flatten().map(|(a, b)| &self.key_buf[a..b])
    }

    /// An owned copy of the key of record `i` (for dead letters).
    pub fn key(&self, i: usize) -> Option<Vec<u8>> {
        self.key_bytes(i).map(<[u8]>::to_vec)
    }

    /// Appends one record.
    pub fn push(&mut self, record: &[u8], position: u64) {
        self.buf.extend_from_slice(record);
        if record.last() != Some(&b'\n') {
            self.buf.push(b'\n');
        }
        self.starts.push(self.buf.len());
        self.positions.push(position);
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Bytes of records `range`, contiguous.
    pub fn slice(&self, range: Range<usize>) -> &[u8] {
        &self.buf[self.starts[range.start]..self.starts[range.end]]
    }

    /// The bytes of record `i` without its line terminator.
    pub fn record(&self, i: usize) -> &[u8] {
        let r = self.slice(i..i + 1);
        let r = r.strip_suffix(b"\n").unwrap_or(r);
        r.strip_suffix(b"\r").unwrap_or(r)
    }
}

/// Decodes a run of records into one batch.
pub trait ChunkDecoder: Send + Sync {
    /// The schema of the batches produced.
    fn schema(&self) -> SchemaRef;

    /// Decodes `bytes`, which hold exactly `rows` records, into one batch of `rows` rows.
    ///
    /// # Errors
    /// The decoder's error, and the stage it belongs to, when any record in `bytes` is bad.
    fn decode(&self, bytes: &[u8], rows: usize) -> Result<RecordBatch, (Stage, String)>;
}

/// Good rows of a decode, as one batch, and the bad records with their errors.
#[derive(Debug)]
pub struct Decoded {
    pub batch: RecordBatch,
    /// Source position of each row of `batch`.
    pub positions: Vec<u64>,
    pub bad: Vec<BadRecord>,
}

/// Decodes `chunk`, isolating bad records.
///
/// # Errors
/// Only when good batches cannot be concatenated (which means a decoder bug).
pub fn decode_chunk(decoder: &dyn ChunkDecoder, chunk: &LineChunk) -> Result<Decoded, ArrowError> {
    let n = chunk.len();
    let mut failures = Vec::new();
    let isolated = isolate(n, |range| {
        decoder.decode(chunk.slice(range.clone()), range.len()).map_err(|(stage, e)| {
            if range.len() == 1 {
                failures.push((range.start, stage));
            }
            e
        })
    });
    let mut positions = Vec::with_capacity(n);
    for r in &isolated.good {
        positions.extend_from_slice(&chunk.positions[r.clone()]);
    }
    let bad = isolated
        .bad
        .into_iter()
        .map(|(i, error)| {
            let stage = failures.iter().find(|(j, _)| *j == i).map(|(_, s)| *s).unwrap_or(Stage::Decode);
            BadRecord {
                position: Some(chunk.positions[i]),
                stage,
                error,
                raw: chunk.record(i).to_vec(),
                key: chunk.key(i),
            }
        })
        .collect();
    let batch = match isolated.batches.len() {
        0 => RecordBatch::new_empty(decoder.schema()),
        1 => isolated.batches.into_iter().next().unwrap_or_else(|| RecordBatch::new_empty(decoder.schema())),
        _ => concat_batches(&decoder.schema(), &isolated.batches)?,
    };
    Ok(Decoded { batch, positions, bad })
}

/// The outcome of [`isolate`].
#[derive(Debug)]
pub struct Isolated<T> {
    /// Output of every range that succeeded, in input order.
    pub batches: Vec<T>,
    /// The input ranges those outputs came from.
    pub good: Vec<Range<usize>>,
    /// Inputs that fail on their own, with the error.
    pub bad: Vec<(usize, String)>,
}

/// Runs `f` over `0..n`; when it fails, bisects until every failing input stands alone.
///
/// Clean input costs one call. `k` bad inputs cost about `2k·log2(n/k)` extra calls, each on a
/// smaller range, so good inputs are still processed in bulk.
pub fn isolate<T>(n: usize, mut f: impl FnMut(Range<usize>) -> Result<T, String>) -> Isolated<T> {
    futures::executor::block_on(isolate_async(n, |r| std::future::ready(f(r))))
}

/// [`isolate`] for an asynchronous `f` (a DataFusion plan).
pub async fn isolate_async<T, F, Fut>(n: usize, mut f: F) -> Isolated<T>
where
    F: FnMut(Range<usize>) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut out = Isolated { batches: Vec::new(), good: Vec::new(), bad: Vec::new() };
    let mut stack: Vec<Range<usize>> = Vec::new();
    if n > 0 {
        stack.push(0..n);
    }
    while let Some(range) = stack.pop() {
        match f(range.clone()).await {
            Ok(batch) => {
                out.batches.push(batch);
                out.good.push(range);
            }
            Err(e) if range.len() == 1 => out.bad.push((range.start, e)),
            Err(_) => {
                let mid = range.start + range.len() / 2;
                // Pushed in reverse so the left half is processed first and output stays in order.
                stack.push(mid..range.end);
                stack.push(range.start..mid);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn isolate_finds_each_bad_input_and_keeps_order() {
        let bad = [3usize, 4, 17, 99];
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let mut calls = 0;
        let out = isolate(100, |r| {
            calls += 1;
            if let Some(b) = bad.iter().find(|b| r.contains(b)) {
                return Err(format!("bad {b}"));
            }
            let col = Int64Array::from_iter_values(r.clone().map(|v| v as i64));
            Ok(RecordBatch::try_new(schema.clone(), vec![Arc::new(col)]).unwrap())
        });
        assert_eq!(out.bad.iter().map(|b| b.0).collect::<Vec<_>>(), bad);
        assert_eq!(out.bad[2].1, "bad 17");
        let values: Vec<i64> = out
            .batches
            .iter()
            .flat_map(|b| b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec())
            .collect();
        let expected: Vec<i64> = (0..100).filter(|v| !bad.contains(&(*v as usize))).collect();
        assert_eq!(values, expected);
        assert!(calls < 60, "bisection should not degrade to one call per row: {calls}");
    }

    #[test]
    fn clean_input_is_one_call() {
        let mut calls = 0;
        let schema = Arc::new(Schema::empty());
        let out = isolate(10_000, |_| {
            calls += 1;
            Ok(RecordBatch::new_empty(schema.clone()))
        });
        assert_eq!((calls, out.bad.len()), (1, 0));
    }
}
