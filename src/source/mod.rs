//! Sources: the [`Source`] trait, the context a shard reader emits into, and the built-in sources.

pub mod file;
pub mod generator;
pub mod kafka;
pub mod postgres;
pub mod s3;

use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, PositionCommitter, RecordingCommitter, ShardInfo, ShardProgress};
use crate::dead_letter::{BadRecord, DeadLetter};
use crate::observe::ComponentMetrics;
use crate::runtime::budget::MemoryBudget;
use crate::runtime::Output;
use crate::{Error, Result};

/// A source of record batches, split into shards that can be read independently.
#[async_trait]
pub trait Source: Send + Sync {
    /// The schema of every batch the source emits.
    fn schema(&self) -> SchemaRef;

    /// The shards to read (files, partitions, ranges), in a stable order.
    ///
    /// # Errors
    /// When the shards cannot be listed (a glob that matches nothing, an unreachable service).
    async fn shards(&self) -> Result<Vec<Arc<ShardInfo>>>;

    /// Reads one shard to its end (or until `ctx.cancel` fires), emitting batches through `ctx`.
    ///
    /// # Errors
    /// I/O errors, and bad records when no dead-letter sink is configured.
    ///
    /// # Cancel safety
    /// Returns promptly after `ctx.cancel` fires; batches already emitted stay valid.
    async fn read_shard(&self, ctx: ShardContext) -> Result<()>;

    /// Where committed positions go. Sources without an external position store (files, the
    /// generator) record them for the run summary only and are read from the start on each run.
    fn committer(&self) -> Arc<dyn PositionCommitter> {
        Arc::new(RecordingCommitter::default())
    }

    /// True when shards never end on their own (partitions of a stream): all of them are read
    /// at once, whatever `shard_parallelism` says.
    fn reads_all_shards_at_once(&self) -> bool {
        false
    }

    /// The shards as they are now. The coordinator lists them again every few seconds to pick up
    /// new ones (partitions added to a topic); [`shards`](Self::shards) may answer from a cache.
    ///
    /// # Errors
    /// As for `shards`.
    async fn list_shards(&self) -> Result<Vec<Arc<ShardInfo>>> {
        self.shards().await
    }

    /// Where each shard ends now and where its committed position is, for lag, by shard id; only
    /// for sources that know (Kafka: the high watermark and the group's committed offset).
    ///
    /// # Errors
    /// When the store cannot be reached.
    async fn lag(&self, _shards: &[Arc<ShardInfo>]) -> Result<std::collections::HashMap<String, ShardLag>> {
        Ok(std::collections::HashMap::new())
    }

    /// For sources that gain shards over time (new objects under a prefix): how often to list
    /// them again. Runs without `--bounded` then keep going, reading each new shard once.
    fn poll_interval(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The end and the committed position of a shard, as positions just past the last record
/// (Kafka offsets): `end - committed` records are not committed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLag {
    pub end: u64,
    pub committed: Option<u64>,
}

/// What one read of a shard produced.
#[derive(Debug)]
pub struct Produced {
    /// Decoded good records.
    pub data: RecordBatch,
    /// Source position of each row of `data`.
    pub positions: Vec<u64>,
    /// Records that could not be decoded or converted.
    pub bad: Vec<BadRecord>,
    /// First and last position covered (good and bad records alike).
    pub first: u64,
    pub last: u64,
    /// Bytes read from the source for these records.
    pub raw_bytes: usize,
}

/// Everything a shard reader needs to emit batches.
pub struct ShardContext {
    pub shard: Arc<ShardInfo>,
    pub progress: Arc<ShardProgress>,
    pub output: Output,
    pub budget: MemoryBudget,
    pub dead_letter: DeadLetter,
    pub metrics: ComponentMetrics,
    pub cancel: CancellationToken,
    pub batch_size: usize,
    /// `sluice run --bounded`: stop at the end positions the shard had when the run started.
    pub bounded: bool,
}

impl ShardContext {
    /// Registers the records of `p` for acknowledgement, sends bad ones to the dead-letter sink and
    /// good ones downstream, waiting for room in the memory budget first.
    ///
    /// # Errors
    /// A bad record without a dead-letter sink; a downstream component that has stopped.
    pub async fn emit(&self, p: Produced) -> Result<()> {
        let started = Instant::now();
        let ack = self.progress.register(p.last);
        // After a stop nothing more goes downstream. A batch abandoned below (the stop came while
        // it waited for memory) holds back every later position of its shard, so a later batch
        // that still got through would be written but never committed: read and written again
        // by the next run (a reader can have its next batch ready when the stop comes).
        if self.cancel.is_cancelled() {
            ack.abandon();
            return Ok(());
        }
        if !p.bad.is_empty() {
            if let Err(e) = self.dead_letter.send(&self.metrics, &self.shard, &ack, p.bad).await {
                // Halt before the ack drops: nothing at or past a bad record may be committed.
                self.progress.halt_pipeline();
                return Err(e);
            }
        }
        let rows = p.data.num_rows();
        if rows > 0 {
            let mem = p.data.get_array_memory_size() as u64;
            let reservation = tokio::select! {
                r = self.budget.reserve(mem) => r,
                _ = self.cancel.cancelled() => {
                    ack.abandon();
                    return Ok(());
                }
            };
            let batch = Batch {
                data: p.data,
                shard: self.shard.clone(),
                first: p.first,
                last: p.last,
                row_positions: Some(p.positions.into()),
                ack,
                memory: Some(Arc::new(reservation)),
            };
            if self.output.send(batch).await.is_err() {
                self.progress.halt_pipeline();
                return Err(self.downstream_stopped());
            }
        }
        self.metrics.sent(rows, p.raw_bytes);
        self.metrics.batch_duration(started.elapsed());
        Ok(())
    }

    fn downstream_stopped(&self) -> Error {
        Error::Internal {
            component: self.metrics.component.clone(),
            message: crate::runtime::DOWNSTREAM_STOPPED.into(),
        }
    }

    /// Runs `next` on a blocking thread (file I/O and decoding) and emits what it produces, one
    /// item ahead, until it returns `None`, fails, or the shard is cancelled.
    ///
    /// # Errors
    /// The first error of `next` or of [`emit`](Self::emit).
    pub async fn run_blocking<F>(&self, mut next: F) -> Result<()>
    where
        F: FnMut() -> Result<Option<Produced>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Result<Produced>>(1);
        let cancel = self.cancel.clone();
        let reader = tokio::task::spawn_blocking(move || {
            while !cancel.is_cancelled() {
                match next() {
                    Ok(Some(p)) => {
                        if tx.blocking_send(Ok(p)).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        break;
                    }
                }
            }
        });
        let mut result = Ok(());
        loop {
            let item = tokio::select! {
                item = rx.recv() => item,
                _ = self.cancel.cancelled() => break,
            };
            match item {
                Some(Ok(p)) => {
                    if let Err(e) = self.emit(p).await {
                        result = Err(e);
                        break;
                    }
                }
                Some(Err(e)) => {
                    result = Err(e);
                    break;
                }
                None => break,
            }
        }
        drop(rx);
        reader
            .await
            .map_err(|e| Error::Internal { component: self.metrics.component.clone(), message: e.to_string() })?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::ShardKind;
    use arrow::array::Int64Array;
    use std::sync::atomic::AtomicBool;

    fn produced(first: u64, rows: u64) -> Produced {
        let positions: Vec<u64> = (first..first + rows).collect();
        let values = Int64Array::from(positions.iter().map(|p| *p as i64).collect::<Vec<_>>());
        let data = RecordBatch::try_from_iter([("v", Arc::new(values) as arrow::array::ArrayRef)]).unwrap();
        Produced { data, positions, bad: Vec::new(), first, last: first + rows - 1, raw_bytes: 0 }
    }

    /// A stop that comes while a batch waits for memory abandons it; a batch the reader had
    /// ready behind it must not go downstream once memory is free, or it would be written but
    /// never committed (its shard's position stops before the abandoned one).
    #[tokio::test]
    async fn nothing_goes_downstream_after_a_stop_abandoned_a_batch() {
        let shard =
            Arc::new(ShardInfo { source: "s".into(), id: "t/0".into(), kind: ShardKind::Sequence, epoch: None });
        let committer = Arc::new(RecordingCommitter::default());
        let progress = ShardProgress::new(shard.clone(), committer.clone(), Arc::new(AtomicBool::new(false)));
        let (tx, mut rx) = mpsc::channel(64);
        let budget = MemoryBudget::new(1);
        let ctx = Arc::new(ShardContext {
            shard,
            progress,
            output: Output::new(vec![tx]),
            budget: budget.clone(),
            dead_letter: DeadLetter::new(None),
            metrics: ComponentMetrics::new("s"),
            cancel: CancellationToken::new(),
            batch_size: 10,
            bounded: false,
        });

        ctx.emit(produced(0, 10)).await.unwrap();
        drop(rx.recv().await.expect("the first batch goes downstream"));
        assert_eq!(committer.positions()[&("s".to_string(), "t/0".to_string())], 9);

        // The downstream holds the whole budget; the next batch waits for it, and the stop comes.
        let held = budget.reserve(u64::MAX).await;
        let waiting = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.emit(produced(10, 10)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the batch waits for memory");
        ctx.cancel.cancel();
        waiting.await.unwrap().unwrap();
        drop(held);

        // Memory is free again; what the reader still had must stay out of the pipeline.
        for i in 2..22 {
            ctx.emit(produced(i * 10, 10)).await.unwrap();
        }
        assert!(rx.try_recv().is_err(), "a batch went downstream after the stop");
        assert_eq!(committer.positions()[&("s".to_string(), "t/0".to_string())], 9, "nothing past the stop");
    }
}
