//! The runtime: builds a pipeline's components, wires them with bounded channels, runs every shard
//! of every source, and stops cleanly (graceful stop, or abort on the first error).

pub mod budget;
pub mod build;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, ShardProgress};
use crate::config::PipelineSettings;
use crate::dead_letter::DeadLetter;
use crate::observe::{ComponentMetrics, ComponentStats, Health};
use crate::sink::Sink;
use crate::source::{ShardContext, Source};
use crate::transform::Transform;
use crate::{Error, Result};

pub use build::build;

/// Message of the error a component reports when the next one has stopped (never the root cause).
pub const DOWNSTREAM_STOPPED: &str = "a downstream component stopped";

/// Sends each batch to every downstream component (fan-out), waiting while one is full.
#[derive(Clone)]
pub struct Output {
    targets: Arc<[mpsc::Sender<Batch>]>,
}

impl Output {
    pub fn new(targets: Vec<mpsc::Sender<Batch>>) -> Self {
        Output { targets: targets.into() }
    }

    /// # Errors
    /// When a downstream component has stopped.
    ///
    /// # Cancel safety
    /// Not cancel safe: a batch may have reached some targets and not others.
    pub async fn send(&self, batch: Batch) -> Result<(), ()> {
        let Some((last, rest)) = self.targets.split_last() else { return Ok(()) };
        for t in rest {
            t.send(batch.clone()).await.map_err(|_| ())?;
        }
        last.send(batch).await.map_err(|_| ())
    }
}

pub(crate) struct BuiltSource {
    pub id: String,
    pub source: Arc<dyn Source>,
    /// `section.id` of each downstream component.
    pub outputs: Vec<String>,
    pub metrics: ComponentMetrics,
}

pub(crate) struct BuiltTransform {
    pub id: String,
    pub transform: Box<dyn Transform>,
    pub outputs: Vec<String>,
    pub metrics: ComponentMetrics,
}

pub(crate) struct BuiltSink {
    pub id: String,
    pub sink: Box<dyn Sink>,
    pub metrics: ComponentMetrics,
    #[allow(dead_code)]
    pub inputs: Vec<String>,
}

/// A validated, built pipeline, ready to run.
pub struct Pipeline {
    settings: PipelineSettings,
    sources: Vec<BuiltSource>,
    transforms: Vec<BuiltTransform>,
    sinks: Vec<BuiltSink>,
    dead_letter: Option<BuiltSink>,
    schemas: HashMap<String, SchemaRef>,
}

/// How to run a pipeline.
#[derive(Default)]
pub struct RunOptions {
    /// Cancelled for a graceful stop: sources stop reading, everything read is written and
    /// committed, and `run` returns `Ok`.
    pub stop: CancellationToken,
    /// Print a live progress line on stderr when it is a terminal.
    pub progress: bool,
    /// Readiness for `/readyz`.
    pub health: Health,
    /// Stop each unbounded source (Kafka) at the positions that were its end when the run started,
    /// instead of reading on (a backfill: "available now").
    pub bounded: bool,
    /// Worker mode: read exactly these shards of each source (by source id; a source missing
    /// here reads nothing), as the coordinator assigned them, instead of listing them.
    pub assigned: Option<HashMap<String, Vec<Arc<crate::batch::ShardInfo>>>>,
    /// Where the progress of every shard read goes, for callers that report it while the run
    /// goes on (the worker's heartbeats).
    pub shard_registry: Option<ShardRegistry>,
}

/// The progress of every shard a run has started, shared with the caller.
pub type ShardRegistry = Arc<std::sync::Mutex<Vec<Arc<ShardProgress>>>>;

/// Totals of one component after a run.
#[derive(Debug, Clone)]
pub struct ComponentSummary {
    pub id: String,
    pub kind: &'static str,
    pub records_in: u64,
    pub records_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dead_lettered: u64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub elapsed: Duration,
    pub components: Vec<ComponentSummary>,
    /// Committed position of every shard, by (source, shard).
    pub committed: Vec<(String, String, Option<u64>)>,
    /// Whether the run ended by a stop request rather than the end of its input.
    pub stopped: bool,
}

impl RunSummary {
    /// Records dead-lettered by all components.
    pub fn dead_lettered(&self) -> u64 {
        self.components.iter().map(|c| c.dead_lettered).sum()
    }

    /// The summary of component `id`.
    pub fn component(&self, id: &str) -> Option<&ComponentSummary> {
        self.components.iter().find(|c| c.id == id)
    }
}

impl Pipeline {
    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The output schema of every source and transform, by id.
    pub fn schemas(&self) -> &HashMap<String, SchemaRef> {
        &self.schemas
    }

    /// Every source, by id (the coordinator lists their shards).
    pub fn sources(&self) -> Vec<(String, Arc<dyn Source>)> {
        self.sources.iter().map(|s| (s.id.clone(), s.source.clone())).collect()
    }

    /// (sources, transforms, sinks) counts.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.sources.len(), self.transforms.len(), self.sinks.len())
    }

    /// Runs until every source is exhausted, `options.stop` fires, or a component fails.
    ///
    /// # Errors
    /// The first component failure (never "downstream stopped" when a root cause is known). After
    /// a failure nothing more is committed.
    pub async fn run(self, options: RunOptions) -> Result<RunSummary> {
        let started = Instant::now();
        let s = &self.settings;
        let abort = CancellationToken::new();
        let stop = abort.child_token();
        let halted = Arc::new(AtomicBool::new(false));
        let budget = budget::MemoryBudget::new(s.memory_budget.0);

        // One bounded channel into every transform and sink.
        let mut senders: HashMap<String, mpsc::Sender<Batch>> = HashMap::new();
        let mut receivers: HashMap<String, mpsc::Receiver<Batch>> = HashMap::new();
        for key in self
            .transforms
            .iter()
            .map(|t| format!("transforms.{}", t.id))
            .chain(self.sinks.iter().map(|k| format!("sinks.{}", k.id)))
        {
            let (tx, rx) = mpsc::channel(s.channel_capacity);
            senders.insert(key.clone(), tx);
            receivers.insert(key, rx);
        }
        let (dl_tx, dl_rx) = match &self.dead_letter {
            Some(_) => {
                let (tx, rx) = mpsc::channel(s.channel_capacity * 4);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let output_for = |outputs: &[String]| Output::new(outputs.iter().map(|o| senders[o].clone()).collect());

        let mut stats: Vec<(String, &'static str, Arc<ComponentStats>)> = Vec::new();
        let mut progress_sources = Vec::new();
        let mut committers = Vec::new();
        let mut progress_sinks = Vec::new();
        let mut tasks: JoinSet<(String, Result<()>)> = JoinSet::new();
        let progress_registry = options.shard_registry.clone().unwrap_or_default();

        for src in self.sources {
            let assigned = options.assigned.as_ref().map(|a| a.get(&src.id).cloned().unwrap_or_default());
            stats.push((src.id.clone(), "source", src.metrics.stats.clone()));
            progress_sources.push(src.metrics.stats.clone());
            let output = output_for(&src.outputs);
            let committer = src.source.committer();
            committers.push((src.id.clone(), committer.clone()));
            let ctx = SourceRun {
                id: src.id.clone(),
                committer,
                bounded: options.bounded,
                source: src.source,
                output,
                metrics: src.metrics,
                budget: budget.clone(),
                dead_letter: DeadLetter::new(dl_tx.clone()),
                stop: stop.clone(),
                halted: halted.clone(),
                parallelism: s.shard_parallelism,
                batch_size: s.batch_size,
                registry: progress_registry.clone(),
                assigned,
            };
            tasks.spawn(async move { (src.id, ctx.run().await) });
        }
        for t in self.transforms {
            stats.push((t.id.clone(), "transform", t.metrics.stats.clone()));
            let rx = receivers.remove(&format!("transforms.{}", t.id)).expect("a channel per transform");
            let output = output_for(&t.outputs);
            let dl = DeadLetter::new(dl_tx.clone());
            let (abort, halted) = (abort.clone(), halted.clone());
            tasks.spawn(async move {
                (t.id.clone(), run_transform(t.transform, rx, output, dl, t.metrics, abort, halted).await)
            });
        }
        drop(senders);
        for mut k in self.sinks {
            k.sink.set_dead_letter(DeadLetter::new(dl_tx.clone()));
            stats.push((k.id.clone(), "sink", k.metrics.stats.clone()));
            progress_sinks.push(k.metrics.stats.clone());
            let rx = receivers.remove(&format!("sinks.{}", k.id)).expect("a channel per sink");
            let (abort, halted) = (abort.clone(), halted.clone());
            tasks.spawn(async move { (k.id.clone(), run_sink(k.sink, rx, k.metrics, abort, halted).await) });
        }
        drop(dl_tx);
        if let (Some(k), Some(rx)) = (self.dead_letter, dl_rx) {
            stats.push((k.id.clone(), "dead_letter", k.metrics.stats.clone()));
            let (abort, halted) = (abort.clone(), halted.clone());
            tasks.spawn(async move { (k.id.clone(), run_sink(k.sink, rx, k.metrics, abort, halted).await) });
        }

        let progress_stop = CancellationToken::new();
        let progress = if options.progress {
            crate::observe::spawn_progress(progress_sources, progress_sinks, progress_stop.clone())
        } else {
            None
        };
        let user_stop = options.stop.clone();
        let stop_link = {
            let stop = stop.clone();
            tokio::spawn(async move {
                user_stop.cancelled().await;
                tracing::info!("stop requested: finishing the batches in flight");
                stop.cancel();
            })
        };
        options.health.set_ready(true);
        tracing::info!(pipeline = %s.name, "pipeline running");

        let mut first_error: Option<(String, Error)> = None;
        while let Some(joined) = tasks.join_next().await {
            let (id, result) = match joined {
                Ok(r) => r,
                Err(e) => {
                    ("(task)".to_string(), Err(Error::Internal { component: "(task)".into(), message: e.to_string() }))
                }
            };
            if let Err(e) = result {
                halted.store(true, Ordering::SeqCst);
                abort.cancel();
                let secondary = matches!(&e, Error::Internal { message, .. } if message == DOWNSTREAM_STOPPED || message.contains("has stopped"));
                match &first_error {
                    None => first_error = Some((id, e)),
                    Some((_, prev))
                        if !secondary
                            && matches!(prev, Error::Internal { message, .. } if message == DOWNSTREAM_STOPPED || message.contains("has stopped")) =>
                    {
                        first_error = Some((id, e))
                    }
                    _ => tracing::debug!(component = %id, error = %e, "further error after the first"),
                }
            }
        }
        options.health.set_ready(false);
        stop_link.abort();
        // Positions that became durable are handed to their stores now (Kafka commits them
        // synchronously), after a failure too: only what is durable was ever queued.
        for (id, committer) in &committers {
            if let Err(e) = committer.flush().await {
                tracing::warn!(source = %id, "committing positions at the end of the run failed: {e}");
                if first_error.is_none() {
                    first_error = Some((id.clone(), e));
                }
            }
        }
        progress_stop.cancel();
        if let Some(p) = progress {
            let _ = p.await;
        }
        if let Some((id, e)) = first_error {
            tracing::error!(component = %id, "pipeline failed: {e}");
            return Err(e);
        }
        let shard_progress = progress_registry.lock().map(|r| r.clone()).unwrap_or_default();
        let committed =
            shard_progress.iter().map(|p| (p.shard().source.clone(), p.shard().id.clone(), p.committed())).collect();
        let components = stats
            .into_iter()
            .map(|(id, kind, st)| ComponentSummary {
                id,
                kind,
                records_in: st.records_in.load(Ordering::Relaxed),
                records_out: st.records_out.load(Ordering::Relaxed),
                bytes_in: st.bytes_in.load(Ordering::Relaxed),
                bytes_out: st.bytes_out.load(Ordering::Relaxed),
                dead_lettered: st.dead_lettered.load(Ordering::Relaxed),
            })
            .collect();
        Ok(RunSummary { elapsed: started.elapsed(), components, committed, stopped: options.stop.is_cancelled() })
    }
}

/// The shards of a new listing that this run does not know yet; they count as `active` until
/// their read ends. A shard is known while it is active or its progress is in the registry, and
/// its progress leaves the registry once it is no longer listed (an S3 object done, or deleted),
/// its read has ended and nothing of it is in flight: an endless run over ever-new objects kept
/// every object it ever read. An object deleted and uploaded again while its first read goes on
/// is therefore not read twice at once.
fn newly_listed(
    found: Vec<Arc<crate::batch::ShardInfo>>,
    registry: &ShardRegistry,
    active: &std::sync::Mutex<HashSet<String>>,
    source: &str,
) -> Vec<Arc<crate::batch::ShardInfo>> {
    let mut active = active.lock().unwrap_or_else(|e| e.into_inner());
    let mut known: HashSet<String> = HashSet::new();
    {
        let listed: HashSet<&str> = found.iter().map(|s| s.id.as_str()).collect();
        registry.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| {
            let shard = p.shard();
            if shard.source != source {
                return true;
            }
            let keep = listed.contains(shard.id.as_str()) || active.contains(&shard.id) || p.in_flight() > 0;
            if keep {
                known.insert(shard.id.clone());
            }
            keep
        });
    }
    let new: Vec<_> = found.into_iter().filter(|s| !known.contains(&s.id) && !active.contains(&s.id)).collect();
    active.extend(new.iter().map(|s| s.id.clone()));
    new
}

/// One source's shards, read `parallelism` at a time.
struct SourceRun {
    id: String,
    committer: Arc<dyn crate::batch::PositionCommitter>,
    bounded: bool,
    source: Arc<dyn Source>,
    output: Output,
    metrics: ComponentMetrics,
    budget: budget::MemoryBudget,
    dead_letter: DeadLetter,
    stop: CancellationToken,
    halted: Arc<AtomicBool>,
    parallelism: usize,
    batch_size: usize,
    registry: ShardRegistry,
    /// Worker mode: these shards only, never listed again.
    assigned: Option<Vec<Arc<crate::batch::ShardInfo>>>,
}

impl SourceRun {
    async fn run(self) -> Result<()> {
        let shards = match &self.assigned {
            Some(a) => a.clone(),
            None => self.source.shards().await?,
        };
        tracing::info!(source = %self.id, shards = shards.len(), "reading");
        let committer = self.committer.clone();
        // Sources whose shards never end on their own (Kafka partitions) read all at once.
        let parallelism = if self.source.reads_all_shards_at_once() { shards.len().max(1) } else { self.parallelism };
        // Cancelled on a stop request, or by this source when one of its shards fails.
        let cancel = self.stop.child_token();
        // Shards found by listing again every `poll_interval` (unbounded runs of sources that
        // gain shards), each read once while it stays listed, until the run stops.
        let poll = self.source.poll_interval().filter(|_| !self.bounded && self.assigned.is_none());
        // Shards handed out and not yet read to their end.
        let active: Arc<std::sync::Mutex<HashSet<String>>> =
            Arc::new(std::sync::Mutex::new(shards.iter().map(|s| s.id.clone()).collect()));
        let (registry, source_id, listing_active) = (self.registry.clone(), self.id.clone(), active.clone());
        let later =
            futures::stream::unfold((self.source.clone(), cancel.clone()), move |(source, cancel)| async move {
                let every = poll?;
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = cancel.cancelled() => return None,
                }
                let found = match source.shards().await {
                    Ok(found) => Some(found),
                    Err(e) => {
                        tracing::warn!(error = %e, "listing new shards failed; trying again later");
                        None
                    }
                };
                Some((found, (source, cancel)))
            })
            .flat_map(move |found| {
                let Some(found) = found else { return futures::stream::iter(Vec::new()) };
                futures::stream::iter(newly_listed(found, &registry, &listing_active, &source_id))
            })
            .boxed();
        let all = futures::stream::iter(shards).chain(later);
        let mut reads = all
            .map(|shard| {
                let progress = ShardProgress::new(shard.clone(), committer.clone(), self.halted.clone());
                // Before the shard leaves `active`, so a listing always knows it by one of them.
                self.registry.lock().unwrap_or_else(|e| e.into_inner()).push(progress.clone());
                let ctx = ShardContext {
                    shard: shard.clone(),
                    progress,
                    output: self.output.clone(),
                    budget: self.budget.clone(),
                    dead_letter: self.dead_letter.clone(),
                    metrics: self.metrics.clone(),
                    cancel: cancel.clone(),
                    batch_size: self.batch_size,
                    bounded: self.bounded,
                };
                let source = self.source.clone();
                let active = active.clone();
                async move {
                    let r = source.read_shard(ctx).await;
                    tracing::debug!(shard = %shard.id, ok = r.is_ok(), "shard finished");
                    active.lock().unwrap_or_else(|e| e.into_inner()).remove(&shard.id);
                    r
                }
            })
            .buffer_unordered(parallelism);
        // Every shard future runs to its end (they all honour `cancel`): dropping one mid-send
        // would drop a batch whose ack then counts as delivered.
        let mut first_error = None;
        while let Some(r) = reads.next().await {
            if let Err(e) = r {
                if first_error.is_none() {
                    self.halted.store(true, Ordering::SeqCst);
                    cancel.cancel();
                    first_error = Some(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn run_transform(
    mut transform: Box<dyn Transform>,
    mut rx: mpsc::Receiver<Batch>,
    output: Output,
    dead_letter: DeadLetter,
    metrics: ComponentMetrics,
    abort: CancellationToken,
    halted: Arc<AtomicBool>,
) -> Result<()> {
    loop {
        let batch = tokio::select! {
            b = rx.recv() => match b { Some(b) => b, None => return Ok(()) },
            _ = abort.cancelled() => return Ok(()),
        };
        let started = Instant::now();
        metrics.received(batch.data.num_rows(), batch.data.get_array_memory_size());
        // Held until the batch is through, so a failure halts commits before its ack can drop.
        let ack = batch.ack.clone();
        let result = async {
            for out in transform.process(batch, &dead_letter, &metrics).await? {
                metrics.sent(out.data.num_rows(), out.data.get_array_memory_size());
                output.send(out).await.map_err(|_| Error::Internal {
                    component: metrics.component.clone(),
                    message: DOWNSTREAM_STOPPED.into(),
                })?;
            }
            Ok::<(), Error>(())
        }
        .await;
        if result.is_err() {
            halted.store(true, Ordering::SeqCst);
        }
        drop(ack);
        result?;
        metrics.batch_duration(started.elapsed());
    }
}

async fn run_sink(
    mut sink: Box<dyn Sink>,
    mut rx: mpsc::Receiver<Batch>,
    metrics: ComponentMetrics,
    abort: CancellationToken,
    halted: Arc<AtomicBool>,
) -> Result<()> {
    let mut tick = tokio::time::interval(crate::sink::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = async {
        loop {
            tokio::select! {
                b = rx.recv() => match b {
                    Some(batch) => {
                        let started = Instant::now();
                        let (rows, bytes) = (batch.data.num_rows(), batch.data.get_array_memory_size());
                        // Held across the write, so a failure halts commits before the ack drops.
                        let ack = batch.ack.clone();
                        if let Err(e) = sink.write(batch).await {
                            halted.store(true, Ordering::SeqCst);
                            return Err(e);
                        }
                        drop(ack);
                        metrics.received(rows, bytes);
                        metrics.batch_duration(started.elapsed());
                    }
                    // Upstream ended. After a failure elsewhere (commits halted), what the sink
                    // holds is discarded rather than made visible: it is read again next time.
                    None if halted.load(Ordering::SeqCst) => {
                        sink.abort().await;
                        return Ok(());
                    }
                    None => return sink.finish().await,
                },
                _ = tick.tick() => sink.tick().await?,
                _ = abort.cancelled() => {
                    sink.abort().await;
                    return Ok(());
                }
            }
        }
    }
    .await;
    if result.is_err() {
        // Nothing the sink still holds may be committed: it is read again next time.
        halted.store(true, Ordering::SeqCst);
        sink.abort().await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{RecordingCommitter, ShardInfo, ShardKind};

    fn shard(source: &str, id: &str) -> Arc<ShardInfo> {
        Arc::new(ShardInfo { source: source.into(), id: id.into(), kind: ShardKind::Sequence, epoch: None })
    }

    fn ids(shards: &[Arc<ShardInfo>]) -> Vec<&str> {
        shards.iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn a_listing_gives_what_is_new_and_forgets_what_is_gone() {
        let registry: ShardRegistry = Arc::default();
        let active = std::sync::Mutex::new(HashSet::new());
        let progress = |s: Arc<ShardInfo>| {
            let p = ShardProgress::new(s, Arc::new(RecordingCommitter::default()), Arc::new(AtomicBool::new(false)));
            registry.lock().unwrap().push(p.clone());
            p
        };
        let listing = |ids: &[&str]| ids.iter().map(|id| shard("objects", id)).collect::<Vec<_>>();
        let held = || {
            let mut v: Vec<String> =
                registry.lock().unwrap().iter().map(|p| format!("{}/{}", p.shard().source, p.shard().id)).collect();
            v.sort();
            v
        };
        progress(shard("objects", "a"));
        progress(shard("other", "a")); // another source's shard of the same id
        assert_eq!(ids(&newly_listed(listing(&["a", "b"]), &registry, &active, "objects")), ["b"]);
        let b = progress(shard("objects", "b"));
        let b_batch = b.register(9);
        // a is done (its marker hides it); b is deleted while being read; c is new.
        assert_eq!(ids(&newly_listed(listing(&["c"]), &registry, &active, "objects")), ["c"]);
        assert_eq!(held(), ["objects/b", "other/a"], "a is forgotten, b is still being read");
        // b uploaded again while its first read goes on: not read twice at once.
        assert!(newly_listed(listing(&["b", "c"]), &registry, &active, "objects").is_empty());
        assert!(newly_listed(listing(&["c"]), &registry, &active, "objects").is_empty());
        // Its read ends but a batch is still in flight (its file not yet committed): remembered.
        active.lock().unwrap().remove("b");
        assert!(newly_listed(listing(&["c"]), &registry, &active, "objects").is_empty());
        assert_eq!(held(), ["objects/b", "other/a"]);
        drop(b_batch);
        newly_listed(listing(&["c"]), &registry, &active, "objects");
        assert_eq!(held(), ["other/a"]);
        // Listed again after it was forgotten: read again (a rewritten or re-uploaded object).
        assert_eq!(ids(&newly_listed(listing(&["a", "c"]), &registry, &active, "objects")), ["a"]);
        // Over many listings of ever-new objects whose reads end, nothing of them is kept.
        active.lock().unwrap().clear();
        for n in 0..1000 {
            let new = newly_listed(listing(&[&format!("n-{n}")]), &registry, &active, "objects");
            assert_eq!(new.len(), 1);
            active.lock().unwrap().clear();
        }
        assert_eq!(held(), ["other/a"]);
    }
}
