//! Transforms: the [`Transform`] trait and the built-in `sql` transform.

pub mod sql;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;

use crate::batch::Batch;
use crate::dead_letter::DeadLetter;
use crate::observe::ComponentMetrics;
use crate::Result;

/// Turns each input batch into zero or more output batches with the same provenance.
#[async_trait]
pub trait Transform: Send {
    /// The schema of every output batch.
    fn output_schema(&self) -> SchemaRef;

    /// Processes one batch. Rows that fail go to `dead_letter`; the rest flows on.
    ///
    /// # Errors
    /// Failures not tied to rows, and bad rows when no dead-letter sink is configured.
    async fn process(
        &mut self,
        batch: Batch,
        dead_letter: &DeadLetter,
        metrics: &ComponentMetrics,
    ) -> Result<Vec<Batch>>;
}

/// Row `i` of `batch` as one line of JSON (for dead letters of records that no longer have their
/// original bytes).
pub fn row_as_json(batch: &RecordBatch, i: usize) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
        if w.write(&batch.slice(i, 1)).and_then(|_| w.finish()).is_err() {
            return format!("<row {i} could not be rendered as JSON>").into_bytes();
        }
    }
    if out.last() == Some(&b'\n') {
        out.pop();
    }
    out
}
