//! What flows between components: a record batch with its shard, position range and acknowledgement.
//!
//! Every batch a source emits gets an [`Ack`]. Components pass it along with the data they derive
//! from the batch (transform output, dead-letter records, rows buffered in an open sink file) and drop
//! it once that data is durable or no longer needed. When the last clone of a batch's `Ack` is
//! dropped, the batch is done; a shard's committed position advances over every batch that is done,
//! in order, and is handed to the source's [`PositionCommitter`] (Kafka offsets, a checkpoint table).

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;

use crate::runtime::budget::MemoryReservation;

/// What kind of thing a shard is, which decides how positions are written in dead letters and logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShardKind {
    /// A file; positions are 1-based line numbers (record numbers for Parquet). `version`
    /// identifies its content where the store gives one (an S3 ETag): a rewritten object is
    /// another version, which the coordinator hands out again even if the old one finished.
    File {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    /// A range of a generated sequence; positions are record indexes.
    Sequence,
    /// A Kafka topic partition; positions are offsets.
    Partition { topic: String, partition: i32 },
}

/// One independently readable part of a source: a file, a Kafka partition, a table range.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    /// Id of the source component that owns the shard.
    pub source: String,
    /// Unique within the source, stable across runs (a path, `topic/partition`, `gen-0`).
    pub id: String,
    pub kind: ShardKind,
    /// Worker mode: the epoch of the coordinator's grant under which this shard is being read.
    /// Batches read under one grant are refused once the worker holds the shard at another epoch
    /// (granted to it again after its lease ran out), so a generation that is still draining cannot
    /// write with its successor's epoch. `None` outside worker mode and in the coordinator's lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

impl ShardInfo {
    /// A human-readable position, e.g. `data/orders.ndjson:17` or `orders gen-0 #42`.
    pub fn describe(&self, position: u64) -> String {
        match &self.kind {
            ShardKind::File { path, .. } => format!("{path}:{position}"),
            ShardKind::Sequence => format!("source `{}` shard {} record {position}", self.source, self.id),
            ShardKind::Partition { topic, partition } => {
                format!("topic {topic} partition {partition} offset {position}")
            }
        }
    }

    /// The version of the shard's content where the store gives one (an S3 object's ETag).
    pub fn version(&self) -> Option<&str> {
        match &self.kind {
            ShardKind::File { version, .. } => version.as_deref(),
            _ => None,
        }
    }

    /// A short, stable hash of [`version`](Self::version) for output names, so the files of two
    /// versions of one object (a rewritten object starts again at its first position) never
    /// share a name.
    pub fn version_tag(&self) -> Option<String> {
        self.version().map(|v| format!("{:08x}", fnv1a(v.as_bytes())))
    }

    /// The shard id reduced to characters that are safe in a file or object name, stable for a
    /// given id (long ids are shortened and suffixed with a hash so two never collide).
    pub fn file_token(&self) -> String {
        let clean: String =
            self.id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        if clean.len() <= 48 && clean == self.id {
            return clean;
        }
        let hash = fnv1a(self.id.as_bytes());
        let tail: String = clean.chars().rev().take(32).collect::<Vec<_>>().into_iter().rev().collect();
        format!("{}-{hash:08x}", tail.trim_start_matches('_'))
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// A batch of records and where they came from.
#[derive(Clone)]
pub struct Batch {
    pub data: RecordBatch,
    pub shard: Arc<ShardInfo>,
    /// Position of the first record the batch covers (inclusive).
    pub first: u64,
    /// Position of the last record the batch covers (inclusive).
    pub last: u64,
    /// The source position of each row, while rows still map one to one to source records
    /// (cleared by transforms that filter or reshape).
    pub row_positions: Option<Arc<[u64]>>,
    /// Done when every clone is dropped.
    pub ack: Ack,
    /// The share of the memory budget the batch holds; released when the last clone drops.
    pub memory: Option<Arc<MemoryReservation>>,
}

impl Batch {
    /// The same provenance with other data (a transform's output, a filtered subset).
    pub fn with_data(&self, data: RecordBatch, row_positions: Option<Arc<[u64]>>) -> Batch {
        Batch { data, row_positions, ..self.clone() }
    }

    /// Source position of row `i`, when still known.
    pub fn row_position(&self, i: usize) -> Option<u64> {
        self.row_positions.as_ref().and_then(|p| p.get(i).copied())
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("rows", &self.data.num_rows())
            .field("shard", &self.shard.id)
            .field("first", &self.first)
            .field("last", &self.last)
            .finish()
    }
}

/// Receives a shard's committed position each time it advances.
///
/// Called with a lock held on the shard's progress: implementations must not block (queue the
/// commit, as rdkafka's async commit does).
#[async_trait::async_trait]
pub trait PositionCommitter: Send + Sync {
    fn commit(&self, shard: &ShardInfo, position: u64);

    /// Makes every position handed to `commit` so far durable in the store (end of a run).
    ///
    /// # Errors
    /// When the store refuses or cannot be reached.
    async fn flush(&self) -> crate::Result<()> {
        Ok(())
    }
}

/// A committer that only records the positions (sources without an external position store:
/// files and the generator are re-read from the start on each run).
#[derive(Debug, Default)]
pub struct RecordingCommitter {
    positions: Mutex<indexmap::IndexMap<(String, String), u64>>,
}

impl RecordingCommitter {
    /// The last committed position of every shard, by (source, shard id).
    pub fn positions(&self) -> indexmap::IndexMap<(String, String), u64> {
        self.positions.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl PositionCommitter for RecordingCommitter {
    fn commit(&self, shard: &ShardInfo, position: u64) {
        if let Ok(mut p) = self.positions.lock() {
            p.insert((shard.source.clone(), shard.id.clone()), position);
        }
        metrics::counter!(crate::observe::names::COMMITS_TOTAL, "component" => shard.source.clone()).increment(1);
    }
}

/// Tracks the batches of one shard between emission and completion.
pub struct ShardProgress {
    shard: Arc<ShardInfo>,
    committer: Arc<dyn PositionCommitter>,
    halted: Arc<AtomicBool>,
    state: Mutex<ProgressState>,
}

#[derive(Default)]
struct ProgressState {
    next_seq: u64,
    /// Sequence number of `pending[0]`.
    base_seq: u64,
    /// (last position, done) of each batch not yet committed, in emission order.
    pending: VecDeque<(u64, bool)>,
    committed: Option<u64>,
}

impl ShardProgress {
    /// `halted` is set when the pipeline fails: from then on nothing more is committed, so records
    /// after a failure are read again next time.
    pub fn new(shard: Arc<ShardInfo>, committer: Arc<dyn PositionCommitter>, halted: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(ShardProgress { shard, committer, halted, state: Mutex::new(ProgressState::default()) })
    }

    /// Registers the next batch, which covers positions up to `last`, and returns its [`Ack`].
    pub fn register(self: &Arc<Self>, last: u64) -> Ack {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = st.next_seq;
        st.next_seq += 1;
        st.pending.push_back((last, false));
        Ack(Arc::new(AckInner { progress: self.clone(), seq, abandoned: AtomicBool::new(false) }))
    }

    /// Stops all commits of the pipeline (every shard sharing this flag). Called by a failing
    /// component before it drops the batches it holds, so their acks cannot commit anything.
    pub fn halt_pipeline(&self) {
        self.halted.store(true, Ordering::SeqCst);
    }

    /// The shard this tracks.
    pub fn shard(&self) -> &Arc<ShardInfo> {
        &self.shard
    }

    /// The highest position up to which every batch is done.
    pub fn committed(&self) -> Option<u64> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).committed
    }

    /// Batches emitted and not yet done.
    pub fn in_flight(&self) -> usize {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.pending.iter().filter(|(_, done)| !done).count()
    }

    fn complete(&self, seq: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(idx) = seq.checked_sub(st.base_seq) else { return };
        if let Some(slot) = st.pending.get_mut(idx as usize) {
            slot.1 = true;
        }
        let mut advanced = None;
        while let Some(&(last, true)) = st.pending.front() {
            st.pending.pop_front();
            st.base_seq += 1;
            advanced = Some(last);
        }
        if let Some(pos) = advanced {
            if self.halted.load(Ordering::SeqCst) || PANICKED.load(Ordering::SeqCst) {
                return;
            }
            st.committed = Some(pos);
            self.committer.commit(&self.shard, pos);
        }
    }
}

/// Acknowledgement handle of one source batch; see the module docs.
#[derive(Clone)]
pub struct Ack(Arc<AckInner>);

struct AckInner {
    progress: Arc<ShardProgress>,
    seq: u64,
    abandoned: AtomicBool,
}

impl Drop for AckInner {
    fn drop(&mut self) {
        if !self.abandoned.load(Ordering::SeqCst) {
            self.progress.complete(self.seq);
        }
    }
}

/// Set by the panic hook [`install_panic_guard`] installs: after a panic anywhere in the process,
/// nothing more is committed (unwinding drops acks of data that was never made durable).
static PANICKED: AtomicBool = AtomicBool::new(false);

/// Installs (once) a panic hook that stops all commits before unwinding starts, then runs the
/// previous hook.
pub fn install_panic_guard() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
    });
}

impl Ack {
    /// The shard the batch came from.
    pub fn shard(&self) -> &Arc<ShardInfo> {
        self.0.progress.shard()
    }

    /// Marks the batch as not delivered: it never counts as done, so its shard's committed
    /// position stops just before it and it is read again next time.
    pub fn abandon(self) {
        self.0.abandoned.store(true, Ordering::SeqCst);
    }

    /// An ack that tracks nothing (tests, internal batches).
    pub fn detached(shard: Arc<ShardInfo>) -> Ack {
        let progress =
            ShardProgress::new(shard, Arc::new(RecordingCommitter::default()), Arc::new(AtomicBool::new(false)));
        progress.register(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> Arc<ShardInfo> {
        Arc::new(ShardInfo {
            source: "s".into(),
            id: "data/a b.ndjson".into(),
            kind: ShardKind::File { path: "data/a b.ndjson".into(), version: None },
            epoch: None,
        })
    }

    #[test]
    fn commits_advance_in_order_over_done_batches() {
        let committer = Arc::new(RecordingCommitter::default());
        let halted = Arc::new(AtomicBool::new(false));
        let p = ShardProgress::new(shard(), committer.clone(), halted);
        let a = p.register(10);
        let b = p.register(20);
        let b2 = b.clone();
        let c = p.register(30);
        drop(c);
        assert_eq!(p.committed(), None, "batch 3 done, but 1 and 2 are not");
        drop(a);
        assert_eq!(p.committed(), Some(10));
        drop(b);
        assert_eq!(p.committed(), Some(10), "a clone of batch 2's ack is still held");
        drop(b2);
        assert_eq!(p.committed(), Some(30));
        assert_eq!(committer.positions()[&("s".to_string(), "data/a b.ndjson".to_string())], 30);
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn an_abandoned_batch_stops_commits_just_before_it() {
        let p = ShardProgress::new(shard(), Arc::new(RecordingCommitter::default()), Arc::new(AtomicBool::new(false)));
        let a = p.register(10);
        let b = p.register(20);
        let c = p.register(30);
        b.abandon();
        drop(c);
        drop(a);
        assert_eq!(p.committed(), Some(10), "batches before the abandoned one still commit");
        drop(p.register(40));
        assert_eq!(p.committed(), Some(10), "nothing past it does");
    }

    #[test]
    fn nothing_is_committed_after_a_halt() {
        let halted = Arc::new(AtomicBool::new(false));
        let p = ShardProgress::new(shard(), Arc::new(RecordingCommitter::default()), halted.clone());
        drop(p.register(5));
        let b = p.register(9);
        halted.store(true, Ordering::SeqCst);
        drop(b);
        assert_eq!(p.committed(), Some(5));
    }

    #[test]
    fn file_tokens_are_safe_and_distinct() {
        let s = shard();
        assert_eq!(
            s.file_token().chars().filter(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')).count(),
            0
        );
        let other = ShardInfo { id: "data/a_b.ndjson".into(), ..(*s).clone() };
        assert_ne!(s.file_token(), other.file_token());
        let simple = ShardInfo { id: "gen-0".into(), ..(*s).clone() };
        assert_eq!(simple.file_token(), "gen-0");
    }
}
